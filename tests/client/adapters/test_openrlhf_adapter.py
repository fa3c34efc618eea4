"""OpenRLHF: its own remote-RM client code (openrlhf 0.11, ``openrlhf/utils/agent.py``
``SingleTurnAgentExecutor``) against a live service that assembles groups (``--group-size``).

OpenRLHF posts one query per request; N concurrent per-query calls for one prompt must get the
rewards one grouped ``/v1/rewards`` call gives with the same sigma_ref."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from adapter_support import byte_level_tokenizer, metric
from openrlhf.utils import agent  # installed --no-deps by make test
from support import running_server

from hero_client import HeroClient
from hero_client.adapters import openrlhf as hero_openrlhf

N = 4


@pytest.fixture(scope="module")
def assembling_server():
    with running_server("--verifier-workers", "1", "--group-size", str(N),
                        "--group-timeout-s", "30") as proc:
        yield proc


def whole_group(client: HeroClient, prompt, label: str, responses: list[str], logs: list[dict],
                sigma_ref: float):
    """HERO of the whole group, from the RM scores its per-query requests got (their
    ``extra_logs``, in response order): what their rewards must equal to the last bit. And those
    scores are the RM's for these responses: a grouped call scores them again, in another batch
    composition (a batch of one and a batch of four differ by ~6e-8 in fp32), so to 1e-5."""
    rm_scores = [log["rm_score"][0] for log in logs]
    group = {"prompt": prompt, "reference": label, "responses": responses}
    rescored = client.score([group], sigma_ref=sigma_ref).groups[0]
    assert rm_scores == pytest.approx(rescored.rm_scores, abs=1e-5)
    return client.score([{**group, "rm_scores": rm_scores}], sigma_ref=sigma_ref).groups[0]


def test_openrlhf_per_query_requests_equal_one_grouped_call(assembling_server, dev_rows):
    url = hero_openrlhf.remote_rm_url(assembling_server.url)
    assert url == assembling_server.url + "/get_reward"
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=url)
    rows = [dev_rows[6], dev_rows[17]]  # mixed groups: correct and incorrect responses
    calls = [(row["prompt"], row["prompt"] + row["responses"][j], row["reference"], k, j)
             for k, row in enumerate(rows) for j in range(N)]
    random.Random(1).shuffle(calls)  # two prompts' samples interleaved, as vLLM finishes them
    scored_before = metric(assembling_server.url, "hero_rollouts_scored_total", 'mode="hero"')

    async def run():
        # exactly what OpenRLHF does per finished sample: one query, its prompt and its label
        return await asyncio.gather(*(executor._fetch_rewards_via_http([query], [prompt], [label])
                                      for prompt, query, label, _, _ in calls))

    answers = [result[0] for result in asyncio.run(run())]  # one shard (one server) each

    assert metric(assembling_server.url, "hero_rollouts_scored_total", 'mode="hero"') \
        - scored_before == 2 * N  # scored once each, in their groups
    with HeroClient(assembling_server.url) as client:
        own_sigma = []
        for k, row in enumerate(rows):
            mine = sorted(((j, a) for (_, _, _, kk, j), a in zip(calls, answers) if kk == k))
            logs = [a["extra_logs"] for _, a in mine]
            assert all(log["partial"] == [0.0] for log in logs)
            sigma_ref = logs[0]["sigma_ref"][0]
            assert all(log["sigma_ref"] == [sigma_ref] for log in logs)
            direct = whole_group(client, row["prompt"], row["reference"], row["responses"][:N],
                                 logs, sigma_ref)
            assert [a["rewards"][0] for _, a in mine] == pytest.approx(direct.rewards, abs=1e-9)
            # scores are the verdicts (OpenRLHF's dynamic filtering), rewards HERO's
            assert [a["scores"][0] for _, a in mine] == [float(v) for v in direct.verified]
            assert [log["verified"][0] for log in logs] == [float(v) for v in direct.verified]
            assert all(log["hero_weight"] == [pytest.approx(direct.weight)] for log in logs)
            own_sigma.append(sigma_ref == pytest.approx(direct.sigma))
    # the first group a fresh service scores has no running mean yet: sigma-bar = its own sigma
    assert any(own_sigma)
    assert metric(assembling_server.url, "hero_sigma_ref_running") > 0


class StandInEngine:
    """Stands in for the vLLM engine OpenRLHF generates with: returns fixed token ids (the
    tokenized dev responses, in order) in vLLM's RequestOutput shape."""

    def __init__(self, completions: list[list[int]]) -> None:
        self._completions = list(completions)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        await asyncio.sleep(0)
        ids = self._completions.pop(0)
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop",
                                                        logprobs=None)])


def execute_samples(url: str, prompt, label, tokenizer, completions: list[list[int]]) -> list[dict]:
    """OpenRLHF's executor run once per completion, concurrently, as its rollout workers do."""
    engine = StandInEngine(completions)
    executor = agent.SingleTurnAgentExecutor(hero_openrlhf.remote_rm_url(url))
    params = SimpleNamespace(max_tokens=4096, logprobs=None)

    async def run():
        return await asyncio.gather(*(
            executor.execute(prompt, label, params, 100_000, tokenizer, engine)
            for _ in completions))

    return asyncio.run(run())


def test_openrlhf_executor_rollouts_are_rewarded_in_their_group(assembling_server, dev_rows):
    """OpenRLHF's whole single-turn path: tokenize the prompt, generate (stand-in engine),
    decode prompt + response into the query, post it; the service strips the prompt back off."""
    row = dev_rows[28]
    tokenizer = byte_level_tokenizer([row["prompt"], *row["responses"]])
    completions = [tokenizer(r, add_special_tokens=False)["input_ids"]
                   for r in row["responses"][:N]]
    outputs = execute_samples(assembling_server.url, row["prompt"], row["reference"], tokenizer,
                              completions)
    rewards = [o["reward"][0] for o in outputs]
    sigma_ref = outputs[0]["extra_logs"]["sigma_ref"][0]
    with HeroClient(assembling_server.url) as client:
        direct = whole_group(client, row["prompt"], row["reference"], row["responses"][:N],
                             [o["extra_logs"] for o in outputs], sigma_ref)
    assert rewards == pytest.approx(direct.rewards, abs=1e-9)
    assert [o["extra_logs"]["verified"][0] for o in outputs] == [float(v) for v in direct.verified]
    assert any(direct.verified) and not all(direct.verified)


def test_openrlhf_templated_prompts_eos_ids_and_numeric_labels(assembling_server, dev_rows):
    """``--data.apply_chat_template`` with the policy's real template (Qwen2.5's, rendered by
    OpenRLHF's own ``preprocess_data``), a numeric label column, and completions that end with the
    EOS token id as vLLM returns them; OpenRLHF decodes with ``skip_special_tokens=False``. The
    service must read the verdicts and rewards of the plain conversation off that."""
    from chat_template_support import dev_messages, template_text
    from openrlhf.datasets.prompts_dataset import preprocess_data

    row = dev_rows[17]  # mixed group, integer answer
    assert row["reference"].isdigit()
    tokenizer = byte_level_tokenizer([row["system"], row["prompt"], *row["responses"]])
    tokenizer.chat_template = template_text("qwen2_5")
    prompt, label = preprocess_data(
        {"input": dev_messages(row), "answer": int(row["reference"])}, input_key="input",
        label_key="answer", apply_chat_template=tokenizer.apply_chat_template)
    assert prompt.startswith("<|im_start|>system\n") and label == int(row["reference"])
    completions = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for r in row["responses"][:N]]
    outputs = execute_samples(assembling_server.url, prompt, label, tokenizer, completions)
    assert all(o["reward"] is not None for o in outputs), "the service refused the request"
    sigma_ref = outputs[0]["extra_logs"]["sigma_ref"][0]
    with HeroClient(assembling_server.url) as client:
        direct = whole_group(client, dev_messages(row), row["reference"], row["responses"][:N],
                             [o["extra_logs"] for o in outputs], sigma_ref)
    assert [o["scores"][0] for o in outputs] == [float(v) for v in direct.verified]
    assert [float(v) for v in direct.verified] == [float(v) for v in row["grader_correct"][:N]]
    assert [o["reward"][0] for o in outputs] == pytest.approx(direct.rewards, abs=1e-9)
    assert all(o["extra_logs"]["prompt_mismatch"] == [0.0] for o in outputs)


def test_openrlhf_reward_file_hook_sends_the_api_key(server, dev_rows, tmp_path, monkeypatch):
    """``--reward.remote_url /path/hero_rm.py``: OpenRLHF loads reward_func from the file and
    calls it per sample in a thread; the adapter's reward_func carries HERO_API_KEY."""
    reward_file = tmp_path / "hero_rm.py"
    reward_file.write_text("from hero_client.adapters.openrlhf import reward_func  # noqa: F401\n")
    monkeypatch.setenv("HERO_URL", server.url)
    monkeypatch.setenv("HERO_API_KEY", "test-key")
    executor = agent.SingleTurnAgentExecutor(str(reward_file))
    assert executor.reward_func is hero_openrlhf.reward_func
    row = dev_rows[0]

    async def run():
        return await executor._fetch_rewards_via_func(
            [row["prompt"] + row["responses"][0]], [row["prompt"]], [row["reference"]])

    (info,) = asyncio.run(run())
    assert len(info["rewards"]) == 1 and info["extra_logs"]["verified"] == [1.0]
    # a lone response is a group of one: the bottom of the correct band, times the weight
    assert info["rewards"][0] == pytest.approx(0.9 * info["extra_logs"]["hero_weight"][0])


def test_openrlhf_check_service_and_launch_flags(assembling_server, server):
    info = hero_openrlhf.check_service(assembling_server.url + "/get_reward",
                                       n_samples_per_prompt=N)
    assert info.group_size == N
    with pytest.raises(ValueError, match=f"--group-size {2 * N}"):
        hero_openrlhf.check_service(assembling_server.url, n_samples_per_prompt=2 * N)
    with pytest.raises(ValueError, match="API key"):  # OpenRLHF's HTTP client sends none
        hero_openrlhf.check_service(server.url, n_samples_per_prompt=N)
    with pytest.raises(ValueError, match="no hero-rewards service"):
        hero_openrlhf.check_service("http://127.0.0.1:9")

    args = hero_openrlhf.openrlhf_args(assembling_server.url, N, label_key="answer")
    assert args == ["--reward.remote_url", assembling_server.url + "/get_reward",
                    "--data.label_key", "answer", "--rollout.n_samples_per_prompt", str(N),
                    "--algo.advantage.estimator", "rloo"]
    with pytest.raises(ValueError, match="cancels"):
        hero_openrlhf.openrlhf_args(assembling_server.url, N, estimator="group_norm")
    # the flags are OpenRLHF's own: its train_ppo_ray parser defines every one of them (read,
    # not imported: importing it needs deepspeed and vllm)
    import openrlhf

    source = (Path(openrlhf.__file__).parent / "cli" / "train_ppo_ray.py").read_text()
    for flag in args[::2]:
        assert f'"{flag}"' in source
