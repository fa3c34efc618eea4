"""verl: the adapter's reward functions driven by verl's own reward code (verl 0.9.1, installed
without its GPU dependencies) against a live service.

- ``verl.workers.reward_manager.batch.BatchRewardManager`` with ``compute_score_batch``;
- ``verl.experimental.reward_loop.RewardLoopWorker`` (the 0.9 trainer's reward path: the ``naive``
  manager, one sample a call, loaded from a file through ``reward.custom_reward_function``) with
  the async ``compute_score``, against a service that assembles groups (``--group-size``), and
  refused against one that does not (each sample would be a group of one: no RM signal, sigma
  collapsed) or assembles groups of another size.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from adapter_support import byte_level_tokenizer, metric
from hero_client import HeroClient
from hero_client.adapters.verl import check_service, client_for, compute_score_batch, group_key
from support import running_server

import verl  # installed --no-deps by make test
import torch


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
    """Without --group-size every per-sample call would be scored as a group of one (RM
    normalised away, sigma 0): the first call raises with the fix, and nothing is scored."""
    samples = rollouts([dev_rows[17]], per_prompt=4, interleave=False)
    scored_before = metric(server.url, "hero_rollouts_scored_total", 'mode="hero"')
    for kwargs in ({"url": server.url, "api_key": "test-key"},
                   {"url": server.url, "api_key": "test-key", "n": "${actor_rollout_ref.rollout.n}"}):
        config = reward_loop_config(reward_file.parent / "tok", reward_file, kwargs)
        with pytest.raises(ValueError, match=r"start it with --group-size") as refused:
            run_reward_loop(config, make_data(tokenizer, samples))
        assert "one sample per call" in str(refused.value)
        if "n" in kwargs:  # the rollout n, known: the fix names it
            assert "--group-size 4" in str(refused.value)
    assert metric(server.url, "hero_rollouts_scored_total", 'mode="hero"') == scored_before

    with pytest.raises(ValueError, match="--group-size 8"):
        check_service(server.url, n=8, api_key="test-key")
    with pytest.raises(ValueError, match="no hero-rewards service answers"):
        from support import free_port
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


def test_verl_reward_loop_worker_assembles_groups_through_the_service(dev_rows, tokenizer,
                                                                       reward_file):
    """verl 0.9's reward path, one sample a call, all of a batch concurrently, through a
    custom_reward_function file; the service assembles each prompt's n samples into one group."""
    n = 4
    rows = [dev_rows[i] for i in (17, 28)]  # both mixed
    samples = rollouts(rows, per_prompt=n, interleave=False)
    random.Random(0).shuffle(samples)

    with running_server("--verifier-workers", "1", "--group-size", str(n),
                        "--group-timeout-s", "30") as hero:
        # n from the rollout config, as docs/trainers.md writes it: checked against the service
        config = reward_loop_config(reward_file.parent / "tok", reward_file,
                                    {"url": hero.url, "n": "${actor_rollout_ref.rollout.n}"},
                                    rollout_n=n)
        outputs = run_reward_loop(config, make_data(tokenizer, samples))

        assert len(outputs) == len(samples)
        infos = [o["reward_extra_info"] for o in outputs]
        assert all(i["hero_partial"] == 0.0 for i in infos)
        assert [set(i) for i in infos] == [set(infos[0])] * len(samples)
        # each sample's reward is its response's reward in its whole group, scored with the
        # sigma-bar the service used for that group
        assert {i["hero_verified"] for i in infos} == {0.0, 1.0}
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
                own_sigma.append(sigma_ref == pytest.approx(direct.sigma))
        # a fresh service: the first group scored is weighted with its own sigma (no sigma-bar yet)
        assert any(own_sigma)

        # the rollout samples 8 per prompt, the service waits for 4: refused, not mis-grouped
        assert check_service(hero.url, n=n).group_size == n
        config = reward_loop_config(reward_file.parent / "tok", reward_file,
                                    {"url": hero.url, "n": "${actor_rollout_ref.rollout.n}"},
                                    rollout_n=8)
        with pytest.raises(ValueError, match="assembles groups of 4.*--group-size 8"):
            run_reward_loop(config, make_data(tokenizer, samples[:2]))
