"""TRL: a real ``trl.GRPOTrainer`` trains a tiny random policy on CPU with HERO rewards from a
live service; and the reward function itself, called the way TRL calls it."""

from __future__ import annotations

import math

import pytest
import trl  # noqa: F401  (installed by make test; a missing trl must fail, not skip)
from adapter_support import metric, minilm_chat_tokenizer, tiny_causal_lm

from hero_client import HeroClient, RunningSigma
from hero_client.adapters.trl import HeroRewardFunction, aligned_spans, group_spans


def math_dataset(rows, conversational: bool = True):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}] if conversational else r["prompt"],
         "answer": r["reference"]} for r in rows])


def grpo_trainer(reward, dataset, tmp_path, **overrides):
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = minilm_chat_tokenizer()
    config = dict(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4,
                  num_generations=2, max_completion_length=8, max_steps=2, logging_steps=1,
                  learning_rate=1e-3, beta=0.0, report_to="none", use_cpu=True, bf16=False,
                  save_strategy="no", seed=0, scale_rewards="batch")
    config.update(overrides)
    return GRPOTrainer(model=tiny_causal_lm(tokenizer), reward_funcs=reward,
                       args=GRPOConfig(**config), train_dataset=dataset, processing_class=tokenizer)


def test_trl_grpo_trainer_trains_with_hero_rewards_from_the_service(server, dev_rows, tmp_path):
    reward = HeroRewardFunction(server.url, api_key="test-key", num_generations=2)
    trainer = grpo_trainer(reward, math_dataset(dev_rows[:8]), tmp_path)
    scored_before = metric(server.url, "hero_rollouts_scored_total", 'mode="hero"')

    trainer.train()

    assert trainer.state.global_step >= 2
    # every completion of both steps went through the service: 2 steps x 2 prompts x 2
    assert reward.calls == 2
    assert metric(server.url, "hero_rollouts_scored_total", 'mode="hero"') - scored_before == 8
    # TRL logged the rewards under the function's __name__, plus the adapter's own metrics
    steps = [log for log in trainer.state.log_history if "rewards/hero/mean" in log]
    assert len(steps) == 2
    for log in steps:
        assert math.isfinite(log["rewards/hero/mean"]) and log["rewards/hero/std"] > 0
        assert 0.4 <= log["hero/weight"] <= 3.0 and log["hero/short_groups"] == 0
    # the client-side running sigma-bar: step 1 sets it, step 2 is weighted with it
    assert steps[0]["hero/sigma_ref"] == pytest.approx(steps[0]["hero/sigma"], rel=1e-5)
    assert steps[1]["hero/sigma_ref"] == pytest.approx(steps[0]["hero/sigma"], rel=1e-5)
    assert reward.running_sigma.value == pytest.approx(
        0.9 * steps[0]["hero/sigma"] + 0.1 * steps[1]["hero/sigma"], rel=1e-5)

    # the rewards TRL trained on are the service's for exactly these prompts and completions
    logged = trainer._logs  # the last generation batch, as TRL keeps it for its completions table
    prompts, completions = list(logged["prompt"]), list(logged["completion"])
    answers = {r["prompt"]: r["reference"] for r in dev_rows[:8]}
    groups = [{"prompt": [{"role": "user", "content": prompts[i][0]["content"]}],
               "reference": answers[prompts[i][0]["content"]],
               "responses": [c[0]["content"] for c in completions[i:i + 2]]}
              for i in range(0, len(prompts), 2)]
    with HeroClient(server.url, api_key="test-key") as client:
        direct = client.score(groups, sigma_ref=reward.last_response.sigma_ref)
    assert list(logged["rewards"]["hero"]) == pytest.approx(
        [x for g in direct.groups for x in g.rewards], abs=1e-5)


def test_trl_trainer_advantages_equal_hero_advantages_with_scale_rewards_none(server, dev_rows,
                                                                               tmp_path):
    """output="advantages" + scale_rewards="none": TRL's advantage is HERO's, weight included."""
    reward = HeroRewardFunction(server.url, api_key="test-key", num_generations=2,
                                output="advantages")
    trainer = grpo_trainer(reward, math_dataset(dev_rows[8:12]), tmp_path,
                           scale_rewards="none", max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1
    hero = [a for g in reward.last_response.groups for a in g.advantages]
    assert list(trainer._logs["advantages"]) == pytest.approx(hero, abs=1e-4)
    assert any(abs(a) > 1e-3 for a in hero)


def test_trl_reward_function_groups_consecutive_prompts_like_a_direct_call(server, dev_rows):
    """Called the way TRL calls it (standard format, dataset columns as keyword lists)."""
    rows = [dev_rows[17], dev_rows[28]]  # groups where the embedded RM and the verifier disagree
    prompts = [rows[0]["prompt"]] * 3 + [rows[1]["prompt"]] * 3
    completions = rows[0]["responses"][:3] + rows[1]["responses"][:3]
    answers = [rows[0]["reference"]] * 3 + [rows[1]["reference"]] * 3
    metrics: dict[str, float] = {}
    extra: dict[str, list] = {}
    reward = HeroRewardFunction(server.url, api_key="test-key")
    out = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 6,
                 answer=answers, level=["x"] * 6, trainer_state=None,
                 log_metric=metrics.__setitem__, log_extra=extra.__setitem__)

    groups = [{"prompt": r["prompt"], "reference": r["reference"], "responses": r["responses"][:3]}
              for r in rows]
    with HeroClient(server.url, api_key="test-key", running_sigma=RunningSigma()) as client:
        direct = client.score(groups)
    assert out == pytest.approx([x for g in direct.groups for x in g.rewards])
    assert metrics["hero/sigma_ref"] == pytest.approx(direct.sigma_ref)
    assert extra["hero_status"] == [s for g in direct.groups for s in g.verifier_status]
    flags = [kind for g in direct.groups for kind in (g.disagreement or [None] * 3)]
    assert "likely_false_negative" in flags
    assert extra["hero_disagreement"] == [kind or "" for kind in flags]
    for kind in ("likely_false_negative", "likely_false_positive"):
        assert metrics[f"hero/{kind}"] == pytest.approx(flags.count(kind) / 6)
    assert reward.running_sigma.value == pytest.approx(direct.sigma_ref)

    # one prompt repeated: num_generations cuts the run into groups
    assert group_spans(["a"] * 6 + ["b"] * 2, 3) == [(0, 3), (3, 6), (6, 8)]
    assert group_spans(["a"] * 6 + ["b"] * 2, None) == [(0, 6), (6, 8)]
    groups_built, _ = HeroRewardFunction(server.url, num_generations=3).build_groups(
        [prompts[0]] * 6, completions, [answers[0]] * 6)
    assert [len(g.responses) for g in groups_built] == [3, 3]

    # the reference column is required for the math verifier, and named in the error
    with pytest.raises(ValueError, match="answer"):
        reward(prompts=prompts, completions=completions, solution_text=answers)
    solution = HeroRewardFunction(server.url, api_key="test-key", reference_column="solution_text")
    # a fresh function has no sigma-bar yet either: the same rewards
    assert solution(prompts=prompts, completions=completions, solution_text=answers) == \
        pytest.approx(out)


def test_trl_reward_function_sends_pieces_when_a_process_slice_cuts_a_group(server, dev_rows):
    """Two processes' reward functions (threads here; test_trl_multiprocess.py runs the real
    trainer on two processes), each called with its contiguous slice of one RepeatSampler
    batch: a group cut in two gets exactly HERO of the whole group, on both sides."""
    from concurrent.futures import ThreadPoolExecutor

    from trl.trainer.utils import RepeatSampler

    rows = dev_rows[30:33]
    order = list(RepeatSampler(rows, mini_repeat_count=2, batch_size=3, seed=0))
    assert len(order) == 6
    params = {"sigma_ref": 0.05}  # one fixed sigma-bar, so a direct call can be compared exactly
    slices = [order[0:3], order[3:6]]  # TRL's split over 2 processes: [a a b | b c c]
    copies = {i: 0 for i in range(3)}

    def completion(i: int) -> str:  # the sampler's k-th copy of row i gets response k
        copies[i] += 1
        return rows[i]["responses"][copies[i] - 1]

    calls = [{"prompts": [rows[i]["prompt"] for i in part],
              "completions": [completion(i) for i in part],
              "answer": [rows[i]["reference"] for i in part]} for part in slices]
    functions = [HeroRewardFunction(server.url, api_key="test-key", num_generations=2,
                                    params=params, process_index=p, run="trl-threads")
                 for p in range(2)]
    metrics: list[dict[str, float]] = [{}, {}]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda p: functions[p](**calls[p], log_metric=metrics[p].__setitem__),
                             range(2)))

    prompts = calls[0]["prompts"] + calls[1]["prompts"]
    completions = calls[0]["completions"] + calls[1]["completions"]
    references = calls[0]["answer"] + calls[1]["answer"]
    groups = [{"prompt": prompts[s], "reference": references[s],
               "responses": completions[s:s + 2]} for s in (0, 2, 4)]
    with HeroClient(server.url, api_key="test-key") as client:
        direct = client.score(groups, params=params)
    assert outs[0] + outs[1] == pytest.approx([x for g in direct.groups for x in g.rewards])
    # every group went as pieces (group_key + group_size); none scored incomplete
    pieces = [g for f in functions for g in f.last_response.groups]
    assert [len(g.rewards) for g in pieces] == [2, 1, 1, 2]
    assert not any(g.partial for g in pieces)
    assert pieces[1].weight == pieces[2].weight == direct.groups[1].weight
    assert [m["hero/partial_groups"] for m in metrics] == [0.0, 0.0]
    assert [f.running_sigma.value for f in functions] == [None, None]  # pieces don't move it

    # spans follow the global batch's group boundaries, from the slice's global offset
    assert aligned_spans(["a", "a", "b"], 2, 0) == [(0, 2), (2, 3)]
    assert aligned_spans(["b", "c", "c"], 2, 3) == [(0, 1), (1, 3)]
    assert aligned_spans(["a", "b"], 2, 0) == [(0, 1), (1, 2)]  # misaligned: never mixed
    # single process, whole groups: no pieces unless forced
    f = HeroRewardFunction(server.url, num_generations=2)
    assert not f.sends_pieces([(0, 2), (2, 4)]) and f.sends_pieces([(0, 2), (2, 3)])
    assert HeroRewardFunction(server.url, num_generations=2, pieces=True).sends_pieces([(0, 2)])
    assert not HeroRewardFunction(server.url, num_generations=2,
                                  pieces=False).sends_pieces([(0, 1)])
    with pytest.raises(ValueError, match="num_generations"):
        HeroRewardFunction(server.url, pieces=True)
