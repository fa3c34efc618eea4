"""verl: the adapter's reward functions driven by verl's own reward code (verl 0.9.1, installed
without its GPU dependencies) against a live service.

- ``verl.workers.reward_manager.batch.BatchRewardManager`` with ``compute_score_batch``;
- ``verl.experimental.reward_loop.RewardLoopWorker`` (the 0.9 trainer's reward path: the ``naive``
  manager, one sample a call, loaded from a file through ``reward.custom_reward_function``) with
  the async ``compute_score``:
  - with ``reward_kwargs.n``: each sample a one-response ``/v1/rewards`` piece, assembled by a
    service started without ``--group-size``; by two replicas sharing a real Redis, a group's
    samples alternating between them; a prompt's key reused in the next step opens a fresh
    group; more groups in flight than the client's default connection cap (either HTTP
    backend);
  - without it: ``/get_reward`` against a service that assembles groups (``--group-size``), and
    refused against one that does not (each sample would be a group of one: no RM signal, sigma
    collapsed).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import time

import numpy as np
import pytest
import torch
from adapter_support import byte_level_tokenizer, metric
from redis_support import RedisServer
from support import ServerProcess, free_port, running_server

from hero_client import AsyncHeroClient, HeroClient, _transport
from hero_client.adapters.verl import (
    check_service,
    client_for,
    compute_score_batch,
    group_key,
    wire_group_key,
)


def make_data(tokenizer, samples):
    """A verl DataProto as the trainer hands it to reward managers: left-padded prompt ids,
    right-padded response ids, the attention mask over both, and the dataset's non-tensor
    fields (data_source, reward_model.ground_truth, extra_info)."""
    from verl import DataProto

    pad = tokenizer.pad_token_id
    prompts = [tokenizer(s["prompt"], add_special_tokens=False)["input_ids"] for s in samples]
    responses = [tokenizer(s["response"], add_special_tokens=False)["input_ids"] for s in samples]
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    prompt_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in responses])
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * (len(p) + len(r)) + [0] * (r_len - len(r))
                         for p, r in zip(prompts, responses)])
    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids,
                 "input_ids": torch.cat([prompt_ids, response_ids], dim=1), "attention_mask": mask},
        non_tensors={
            "data_source": np.array([s["data_source"] for s in samples], dtype=object),
            "reward_model": np.array([{"ground_truth": s["answer"], "style": "rule"}
                                      for s in samples], dtype=object),
            "extra_info": np.array([dict(s["extra_info"]) for s in samples], dtype=object),
        })


def rollouts(rows, per_prompt: int, interleave: bool):
    """Samples for ``rows`` (``per_prompt`` responses each), verl-style extra_info."""
    samples = [[{"prompt": r["prompt"], "response": r["responses"][j], "answer": r["reference"],
                 "data_source": "math", "extra_info": {"index": k, "question": r["prompt"]}}
                for j in range(per_prompt)] for k, r in enumerate(rows)]
    if interleave:  # the group key, not adjacency, must decide the groups
        return [s for j in range(per_prompt) for s in (g[j] for g in samples)]
    return [s for g in samples for s in g]


@pytest.fixture(scope="module")
def tokenizer(dev_rows):
    corpus = [r["prompt"] for r in dev_rows] + [x for r in dev_rows for x in r["responses"]]
    return byte_level_tokenizer(corpus)


def reward_loop_config(tokenizer_dir, reward_file, reward_kwargs, rollout_n: int = 4):
    """The parts of verl's trainer config that RewardLoopWorker reads (as the trainer builds it)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(tokenizer_dir), "tokenizer_path": None},
                              "rollout": {"n": rollout_n}},
        "reward": {
            "num_workers": 1,
            "custom_reward_function": {"path": str(reward_file), "name": "compute_score",
                                       "reward_kwargs": reward_kwargs},
            "reward_manager": {"source": "register", "name": "naive",
                               "module": {"path": None, "name": "custom_reward_manager"}},
            "reward_model": {"enable": False},
        },
    })


def run_reward_loop(config, data):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    async def run():
        worker = RewardLoopWorker(config)  # as verl's RewardLoopManager builds it (no ray)
        return await worker.compute_score_batch(data)

    return asyncio.run(run())


@pytest.fixture()
def reward_file(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    path = tmp_path / "hero_verl.py"
    path.write_text("from hero_client.adapters.verl import compute_score  # noqa: F401\n")
    return path


def test_verl_reward_loop_refuses_a_service_that_does_not_assemble_groups(server, dev_rows,
                                                                         tokenizer, reward_file):
    """Without reward_kwargs.n the adapter posts to /get_reward, where a service without
    --group-size would score every per-sample call as a group of one (RM normalised away,
    sigma 0): the first call raises with both fixes, and nothing is scored."""
    samples = rollouts([dev_rows[17]], per_prompt=4, interleave=False)
    scored_before = metric(server.url, "hero_rollouts_scored_total", 'mode="hero"')
    config = reward_loop_config(reward_file.parent / "tok", reward_file,
                                {"url": server.url, "api_key": "test-key"})
    with pytest.raises(ValueError, match=r"start it with --group-size") as refused:
        run_reward_loop(config, make_data(tokenizer, samples))
    assert "one sample per call" in str(refused.value)
    assert "or pass reward_kwargs.n so the adapter sends pieces" in str(refused.value)
    assert metric(server.url, "hero_rollouts_scored_total", 'mode="hero"') == scored_before

    with pytest.raises(ValueError, match="reward_kwargs.n so the adapter sends pieces"):
        check_service(server.url, api_key="test-key")
    # with n the adapter sends pieces: any service with a group store fits, --group-size or not
    assert check_service(server.url, n=8, api_key="test-key").group_store == "memory"
    with pytest.raises(ValueError, match="no hero-rewards service answers"):
        check_service(f"http://127.0.0.1:{free_port()}", n=8, timeout=2)


def test_verl_batch_reward_manager_scores_groups_by_extra_info_index(server, dev_rows, tokenizer):
    from verl.workers.reward_manager.batch import BatchRewardManager

    rows = [dev_rows[i] for i in (6, 11, 30)]  # row 6: a mixed group (correct and incorrect)
    samples = rollouts(rows, per_prompt=4, interleave=True)
    data = make_data(tokenizer, samples)
    # reward_kwargs from the config reach the function as keyword arguments
    manager = BatchRewardManager(tokenizer, num_examine=0, compute_score=compute_score_batch,
                                 url=server.url, api_key="test-key")
    sigma_ref = client_for(server.url, "test-key").running_sigma.value

    out = manager(data, return_dict=True)

    groups = [{"prompt": r["prompt"], "reference": r["reference"], "responses": r["responses"][:4]}
              for r in rows]
    with HeroClient(server.url, api_key="test-key") as client:
        direct = client.score(groups, sigma_ref=sigma_ref)
    expected = [direct.groups[k].rewards[j] for j in range(4) for k in range(3)]  # interleaved
    reward_tensor = out["reward_tensor"]
    lengths = data.batch["attention_mask"][:, data.batch["prompts"].shape[1]:].sum(-1)
    got = [reward_tensor[i, lengths[i] - 1].item() for i in range(len(samples))]
    assert got == pytest.approx(expected, abs=1e-5)
    assert reward_tensor.sum().item() == pytest.approx(sum(expected), abs=1e-4)  # nothing elsewhere
    info = out["reward_extra_info"]
    assert info["hero_weight"] == pytest.approx(
        [direct.groups[k].weight for j in range(4) for k in range(3)])
    assert info["hero_verified"] == [float(direct.groups[k].verified[j])
                                     for j in range(4) for k in range(3)]
    assert all(len(v) == len(samples) for v in info.values())
    assert 0.0 in info["hero_verified"] and 1.0 in info["hero_verified"]
    for kind in ("likely_false_negative", "likely_false_positive"):
        assert info[f"hero_{kind}"] == [float((direct.groups[k].disagreement or [None] * 4)[j]
                                              == kind) for j in range(4) for k in range(3)]


def test_verl_batch_function_advantages_and_grouping_fallbacks(server, dev_rows):
    rows = dev_rows[5:7]
    n = 3
    strs = [x for r in rows for x in r["responses"][:n]]
    gts = [r["reference"] for r in rows for _ in range(n)]
    infos = [{"question": r["prompt"]} for r in rows for _ in range(n)]  # no index: by text
    out = compute_score_batch(["math"] * 6, strs, gts, infos, url=server.url, api_key="test-key",
                              output="advantages", params={"advantage": "dr_grpo"})
    for k in range(2):
        group = out[k * n:(k + 1) * n]
        assert sum(d["score"] for d in group) == pytest.approx(0.0, abs=1e-9)  # advantages
        assert [d["score"] for d in group] == [d["hero_advantage"] for d in group]
        assert len({d["hero_weight"] for d in group}) == 1
    assert [set(d) for d in out] == [set(out[0])] * 6

    # the keys: an id wins; otherwise prompt text + ground truth; otherwise ground truth only
    assert group_key("m", "4", {"index": 3, "question": "q"}) == group_key("m", "5", {"index": 3})
    assert group_key("m", "4", {"question": "a"}) != group_key("m", "4", {"question": "b"})
    assert group_key("m", "4", {}) == group_key("m", "4", None) != group_key("m", "5", {})


def test_verl_reward_loop_worker_without_n_assembles_groups_through_get_reward(
        dev_rows, tokenizer, reward_file):
    """verl 0.9's reward path, one sample a call, all of a batch concurrently, through a
    custom_reward_function file, without reward_kwargs.n: each sample goes to /get_reward and
    the service's --group-size assembles each prompt's n samples into one group."""
    n = 4
    rows = [dev_rows[i] for i in (17, 28)]  # both mixed
    samples = rollouts(rows, per_prompt=n, interleave=False)
    random.Random(0).shuffle(samples)

    with running_server("--verifier-workers", "1", "--group-size", str(n),
                        "--group-timeout-s", "30") as hero:
        config = reward_loop_config(reward_file.parent / "tok", reward_file, {"url": hero.url},
                                    rollout_n=n)
        outputs = run_reward_loop(config, make_data(tokenizer, samples))

        assert len(outputs) == len(samples)
        infos = [o["reward_extra_info"] for o in outputs]
        assert all(i["hero_partial"] == 0.0 for i in infos)
        assert [set(i) for i in infos] == [set(infos[0])] * len(samples)
        # each sample's reward is its response's reward in its whole group, scored with the
        # sigma-bar the service used for that group
        assert {i["hero_verified"] for i in infos} == {0.0, 1.0}
        assert 1.0 in {i["hero_likely_false_negative"] for i in infos}  # the RM disagrees here
        own_sigma = []
        with HeroClient(hero.url) as client:
            for k, row in enumerate(rows):
                mine = [(s["response"], o, i) for s, o, i in zip(samples, outputs, infos)
                        if s["extra_info"]["index"] == k]
                assert len(mine) == n
                sigma_ref = mine[0][2]["hero_sigma_ref"]
                direct = client.score([{"prompt": row["prompt"], "reference": row["reference"],
                                        "responses": [m[0] for m in mine]}],
                                      sigma_ref=sigma_ref).groups[0]
                got = [m[1]["reward_score"] for m in mine]
                assert got == pytest.approx(direct.rewards, abs=1e-6)
                assert all(m[2]["hero_weight"] == pytest.approx(direct.weight) for m in mine)
                assert_flags([m[2] for m in mine], direct)
                own_sigma.append(sigma_ref == pytest.approx(direct.sigma))
        # a fresh service: the first group scored is weighted with its own sigma (no sigma-bar yet)
        assert any(own_sigma)

        assert check_service(hero.url).group_size == n


# -- reward_kwargs.n: pieces through /v1/rewards -------------------------------------------------

PIECE_ROWS = (6, 17, 28, 37, 3, 9)  # four mixed groups, one all wrong, one with 3 distinct answers


def run_reward_loops(configs, datas):
    """Several reward-loop workers at once (verl runs ``reward.num_workers`` of them), each
    with its own share of the batch."""
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    async def run():
        workers = [RewardLoopWorker(config) for config in configs]
        return await asyncio.gather(*(w.compute_score_batch(d) for w, d in zip(workers, datas)))

    return asyncio.run(run())


def pieces_config(reward_file, url: str, run: str, n: int, api_key=None):
    """reward_kwargs as docs/trainers.md writes them: n (and the run name) from verl's config."""
    kwargs = {"url": url, "n": "${actor_rollout_ref.rollout.n}", "run": run}
    if api_key is not None:
        kwargs["api_key"] = api_key
    return reward_loop_config(reward_file.parent / "tok", reward_file, kwargs, rollout_n=n)


def assert_flags(infos, direct) -> None:
    """The samples' hero_likely_false_* fields are the flags of their whole group."""
    flags = direct.disagreement or [None] * len(infos)
    for kind in ("likely_false_negative", "likely_false_positive"):
        assert [i[f"hero_{kind}"] for i in infos] == [float(f == kind) for f in flags], kind


def check_whole_groups(url: str, rows, samples, outputs, n: int, api_key=None) -> list[float]:
    """Every sample's reward is its response's in HERO of its whole group, scored once: one
    weight and one sigma-bar per group, no partial, every dict the same keys. Returns the
    sigma-bar each group was weighted with."""
    infos = [o["reward_extra_info"] for o in outputs]
    assert [set(i) for i in infos] == [set(infos[0])] * len(samples)
    assert all(i["hero_partial"] == 0.0 for i in infos)
    sigma_refs = []
    with HeroClient(url, api_key=api_key) as client:
        for k, row in enumerate(rows):
            mine = [(s["response"], o, i) for s, o, i in zip(samples, outputs, infos)
                    if s["extra_info"]["index"] == k]
            assert len(mine) == n
            assert len({m[2]["hero_weight"] for m in mine}) == 1
            assert len({m[2]["hero_sigma_ref"] for m in mine}) == 1
            sigma_ref = mine[0][2]["hero_sigma_ref"]
            group = {"prompt": row["prompt"], "reference": row["reference"],
                     "responses": [m[0] for m in mine]}
            # HERO of the whole group from the RM scores the pieces got, to the last bit...
            direct = client.score([{**group, "rm_scores": [m[2]["hero_rm_score"] for m in mine]}],
                                  sigma_ref=sigma_ref).groups[0]
            assert [m[1]["reward_score"] for m in mine] == pytest.approx(direct.rewards,
                                                                         abs=1e-9)
            assert [m[2]["hero_verified"] for m in mine] == [float(v) for v in direct.verified]
            assert mine[0][2]["hero_weight"] == pytest.approx(direct.weight)
            assert_flags([m[2] for m in mine], direct)
            # ...and those are the RM's scores of these responses against this prompt
            rescored = client.score([group], sigma_ref=sigma_ref).groups[0]
            assert [m[2]["hero_rm_score"] for m in mine] == pytest.approx(rescored.rm_scores,
                                                                          abs=1e-5)
            sigma_refs.append(sigma_ref)
    return sigma_refs


def test_verl_reward_loop_with_n_sends_pieces_to_a_service_without_group_size(
        server, dev_rows, tokenizer, reward_file):
    """With reward_kwargs.n each sample is a one-response /v1/rewards piece: the session's
    service (no --group-size) assembles each prompt's n samples, interleaved with the other
    groups' in one batch, into its whole group."""
    n = 8
    rows = [dev_rows[i] for i in PIECE_ROWS]
    samples = rollouts(rows, per_prompt=n, interleave=True)
    run = "verl-pieces-one-replica"
    assert run not in check_service(server.url, n=n, api_key="test-key").running_sigma_ref

    outputs = run_reward_loop(pieces_config(reward_file, server.url, run, n, "test-key"),
                              make_data(tokenizer, samples))

    assert len(outputs) == len(samples)
    sigma_refs = check_whole_groups(server.url, rows, samples, outputs, n, "test-key")
    assert {o["reward_extra_info"]["hero_verified"] for o in outputs} == {0.0, 1.0}
    # the run's sigma-bar series exists on the service now (whole groups of 8 move it)
    running = check_service(server.url, n=n, api_key="test-key").running_sigma_ref
    assert run in running and running[run] > 0
    assert len(sigma_refs) == len(rows)


def test_verl_validation_samples_are_scored_alone_without_waiting_for_n(
        server, dev_rows, tokenizer, reward_file):
    """verl validates with val_kwargs.n samples per prompt (default 1) through the same reward
    function and kwargs (n = rollout.n): a sample whose extra_info split is not train is a group
    of val_n (1: scored at once, never parked waiting for n), and validation groups above one
    weigh on their own sigma-bar series, not training's."""
    rows = [dev_rows[i] for i in PIECE_ROWS]
    run = "verl-validation"
    samples = [{**s, "extra_info": {**s["extra_info"], "split": "test"}}
               for s in rollouts(rows, per_prompt=1, interleave=False)]
    config = pieces_config(reward_file, server.url, run, 8, "test-key")  # n = 8 for training
    started = time.monotonic()
    outputs = run_reward_loop(config, make_data(tokenizer, samples))
    elapsed = time.monotonic() - started
    # the session's service has --group-timeout-s 30 s: a sample waiting for 8 would take that
    assert elapsed < 20, f"validation samples waited for a group: {elapsed:.1f} s"
    infos = [o["reward_extra_info"] for o in outputs]
    assert all(i["hero_partial"] == 0.0 for i in infos)
    with HeroClient(server.url, api_key="test-key") as client:
        for sample, output in zip(samples, outputs):
            alone = client.score([{"prompt": sample["prompt"], "reference": sample["answer"],
                                   "responses": [sample["response"]]}]).groups[0]
            assert output["reward_score"] == pytest.approx(alone.rewards[0], abs=1e-9)
    running = check_service(server.url, n=8, api_key="test-key").running_sigma_ref
    assert run not in running and f"{run}/validation" not in running

    # val_n = 2: pieces of two, on the validation series only
    pairs = [{**s, "extra_info": {**s["extra_info"], "split": "test"}}
             for s in rollouts(rows[:3], per_prompt=2, interleave=True)]
    kwargs = {**config.reward.custom_reward_function.reward_kwargs, "val_n": 2}
    config.reward.custom_reward_function.reward_kwargs = kwargs
    outputs = run_reward_loop(config, make_data(tokenizer, pairs))
    assert all(o["reward_extra_info"]["hero_partial"] == 0.0 for o in outputs)
    check_whole_groups(server.url, rows[:3], pairs, outputs, 2, "test-key")
    running = check_service(server.url, n=8, api_key="test-key").running_sigma_ref
    assert f"{run}/validation" in running and run not in running


def test_verl_reward_loop_pieces_assemble_across_two_replicas_sharing_redis(
        dev_rows, tokenizer, reward_file):
    """Two reward-loop workers, one per replica URL; each group's samples alternate between
    them, so every group meets in the Redis group store, and is scored whole and once."""
    n = 8
    rows = [dev_rows[i] for i in PIECE_ROWS]
    samples = rollouts(rows, per_prompt=n, interleave=True)
    halves = [[s for i, s in enumerate(samples) if i // len(rows) % 2 == w] for w in (0, 1)]
    assert all(len(h) == len(samples) // 2 for h in halves)
    run = "verl-pieces-two-replicas"
    with RedisServer() as redis:
        replicas = [ServerProcess(["--group-store", redis.url, "--verifier-workers", "1",
                                   "--group-timeout-s", "60"]) for _ in range(2)]
        try:
            for replica in replicas:
                replica.start()
            assert all(check_service(r.url, n=n).group_store == "redis" for r in replicas)
            outputs = run_reward_loops(
                [pieces_config(reward_file, r.url, run, n) for r in replicas],
                [make_data(tokenizer, h) for h in halves])
            # each replica scored its own half of every group (score locally)...
            scored = [metric(r.url, "hero_rollouts_scored_total", 'mode="hero"')
                      for r in replicas]
            assert scored == [len(samples) // 2] * 2
            # ...and each group was combined once, whole (aggregate globally)
            check_whole_groups(replicas[0].url, rows, halves[0] + halves[1],
                               outputs[0] + outputs[1], n)
            sigma = [check_service(r.url, n=n).running_sigma_ref[run] for r in replicas]
            assert sigma[0] == sigma[1] > 0  # one series in the store, not one per replica
        finally:
            for replica in replicas:
                replica.stop()


def test_verl_reward_loop_reuses_a_prompts_key_in_the_next_step(server, dev_rows, tokenizer,
                                                                reward_file):
    """verl's extra_info index recurs when a prompt is sampled again (next step, next epoch):
    the same key in two consecutive steps gives two whole groups, each of its own step's
    samples, and never a mix. Group 2 samples the very same responses again in step 2."""
    n = 4
    rows = [dev_rows[i] for i in (6, 17, 28)]
    step_rows = [
        [{**r, "responses": r["responses"][:n]} for r in rows],
        [{**r, "responses": r["responses"][n:2 * n]} for r in rows[:2]]
        + [{**rows[2], "responses": rows[2]["responses"][:n]}],
    ]
    config = pieces_config(reward_file, server.url, "verl-pieces-key-reuse", n, "test-key")
    keys = set()
    weighted_with = []
    for step in step_rows:
        samples = rollouts(step, per_prompt=n, interleave=True)
        outputs = run_reward_loop(config, make_data(tokenizer, samples))
        weighted_with.append(check_whole_groups(server.url, step, samples, outputs, n,
                                                "test-key"))
        keys |= {group_key(s["data_source"], s["answer"], s["extra_info"]) for s in samples}
    assert len(keys) == len(rows)  # the same three keys in both steps
    # group 2's same responses were scored afresh in step 2 (with the sigma-bar step 1's groups
    # moved), not answered with step 1's stored result
    assert weighted_with[1][2] != weighted_with[0][2]


@pytest.mark.parametrize("backend", ["aiohttp", "httpx"])
def test_verl_reward_loop_pieces_outnumber_the_default_connection_pool(
        server, dev_rows, tokenizer, reward_file, backend, monkeypatch):
    """Every sample holds its request open until its group is complete. With 101 groups of 2
    whose first members all come first, the first 100 calls complete no group: a client
    capped at the default 100 connections would leave the second members queued behind them
    until the groups closed partial at the deadline. The adapter's client has no cap, on
    aiohttp's pool (``httpx-aiohttp`` installed, what "auto" picks) and on httpx's."""
    monkeypatch.setattr(_transport, "aiohttp_available", lambda: backend == "aiohttp")
    n, groups = 2, 101
    rows = [{**dev_rows[k % len(dev_rows)],
             "responses": dev_rows[k % len(dev_rows)]["responses"][2 * (k // len(dev_rows)):]}
            for k in range(groups)]
    samples = rollouts(rows, per_prompt=n, interleave=True)
    # the premise: more groups than the connections a client opens by default
    default_cap = inspect.signature(AsyncHeroClient).parameters["max_connections"].default
    assert default_cap is not None and default_cap < groups
    outputs = run_reward_loop(
        pieces_config(reward_file, server.url, f"verl-pieces-many-{backend}", n, "test-key"),
        make_data(tokenizer, samples))
    infos = [o["reward_extra_info"] for o in outputs]
    assert all(i["hero_partial"] == 0.0 for i in infos)
    for k in range(groups):  # both members of each group: one weight, one sigma-bar
        mine = [i for s, i in zip(samples, infos) if s["extra_info"]["index"] == k]
        assert len(mine) == n
        assert len({(i["hero_weight"], i["hero_sigma_ref"]) for i in mine}) == 1


def test_verl_long_group_keys_are_hashed_to_the_wire_limit():
    prompt = "x" * 400  # no index: the key carries the whole prompt text
    key = group_key("math", "4", {"question": prompt})
    assert len(key) > 256
    wired = wire_group_key(key)
    assert len(wired) <= 256 and wired == wire_group_key(key)
    assert wired != wire_group_key(group_key("math", "4", {"question": prompt + "y"}))
    short = group_key("math", "4", {"index": 3})
    assert wire_group_key(short) == short and json.loads(short) == ["id", "math", "3"]
