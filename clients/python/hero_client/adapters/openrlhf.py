"""HERO rewards for OpenRLHF.

OpenRLHF (0.11) scores each rollout with a remote reward model: its ``SingleTurnAgentExecutor``
(``openrlhf/utils/agent.py``) posts ``{"query": [prompt + response], "prompts": [prompt],
"labels": [label]}`` to ``--reward.remote_url`` (``--remote_rm_url`` in older, flat-flag
releases), *one sample per request*, the ``n_samples_per_prompt`` samples of a prompt
concurrently. The service's
``/get_reward`` speaks that protocol; started with ``--group-size`` equal to
``--rollout.n_samples_per_prompt`` it holds the requests of one (prompt, label) until the group is
complete, scores it as one HERO group with its server-side running sigma-bar, and answers each
request with its own response's reward (``rewards``) and verdict (``scores``: 1.0 verified, else
0.0 — OpenRLHF's dynamic filtering reads ``scores`` as a [0, 1] value). Prompts rendered with the
policy's chat template (``--data.apply_chat_template``), the policy's EOS text at the end of each
query, and numeric labels are all handled by the service. Nothing of this package runs inside
OpenRLHF::

    hero-rewards serve --host 0.0.0.0 --insecure --group-size 8 --group-timeout-s 120
    python -m openrlhf.cli.train_ppo_ray ... \\
        --reward.remote_url http://hero:8000/get_reward \\
        --data.label_key answer --rollout.n_samples_per_prompt 8 \\
        --algo.advantage.estimator rloo

``openrlhf_args()`` builds those flags and ``check_service()`` checks a service fits them before
a run starts (reachable, group size = n_samples_per_prompt, no API key on ``/get_reward``).

OpenRLHF's HTTP client sends no ``Authorization`` header. To use an API key, point
``--reward.remote_url`` at a Python file instead (OpenRLHF loads ``reward_func`` from it)::

    # hero_rm.py
    from hero_client.adapters.openrlhf import reward_func  # HERO_URL, HERO_API_KEY from the env

OpenRLHF runs that function in a thread per sample (``asyncio.to_thread``), so the default thread
pool (min(32, CPUs + 4) threads per vLLM engine actor) must hold all samples in flight, or groups
only complete at the service's ``--group-timeout-s`` (flagged ``partial``).

**The weight cancels under ``--algo.advantage.estimator group_norm``** (it divides by the group
std). ``rloo``, ``dr_grpo`` and ``reinforce_baseline`` only subtract a group baseline (the last
then whitens over the whole batch), so HERO's weight survives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import httpx

from .._client import DEFAULT_URL, HeroClient
from ..schema import InfoResponse
from ._shared import ProcessCache

_clients: ProcessCache[HeroClient] = ProcessCache()


def base_url(url: str) -> str:
    """The service's base URL from either form (``http://h:8000`` or ``.../get_reward``)."""
    url = url.rstrip("/")
    return url[: -len("/get_reward")] if url.endswith("/get_reward") else url


def remote_rm_url(url: str) -> str:
    """The URL to give OpenRLHF's ``--reward.remote_url``: the service's ``/get_reward``."""
    return base_url(url) + "/get_reward"


def openrlhf_args(url: str, n_samples_per_prompt: int, *, label_key: str = "answer",
                  estimator: str = "rloo") -> list[str]:
    """The OpenRLHF 0.11 ``train_ppo_ray`` flags for HERO rewards from this service."""
    if estimator == "group_norm":
        raise ValueError("group_norm divides by the group std and cancels HERO's weight; use "
                         "rloo, dr_grpo or reinforce_baseline")
    return ["--reward.remote_url", remote_rm_url(url),
            "--data.label_key", label_key,
            "--rollout.n_samples_per_prompt", str(n_samples_per_prompt),
            "--algo.advantage.estimator", estimator]


def check_service(url: str, n_samples_per_prompt: Optional[int] = None,
                  timeout: float = 10.0) -> InfoResponse:
    """Check that OpenRLHF can use the service at ``url`` as its remote RM: it answers, its
    ``/get_reward`` needs no API key (OpenRLHF sends none), and it assembles groups of
    ``n_samples_per_prompt``. Returns the service's info; raises ``ValueError`` saying what to
    change otherwise."""
    base = base_url(url)
    with httpx.Client(base_url=base, timeout=timeout) as http:
        try:
            info = InfoResponse.model_validate_json(http.get("/v1/info").content)
        except httpx.TransportError as exc:
            raise ValueError(f"no hero-rewards service answers at {base}: {exc}") from exc
        probe = http.post("/get_reward", json={"query": []})  # empty: answered, nothing scored
    if probe.status_code == 401:
        raise ValueError(
            f"{base}/get_reward requires an API key, and OpenRLHF's HTTP client sends none: run "
            "the service without --api-key on a private network, or give OpenRLHF a reward file "
            "(from hero_client.adapters.openrlhf import reward_func) with HERO_API_KEY set")
    if n_samples_per_prompt is not None and n_samples_per_prompt > 1:
        if not info.group_size:
            raise ValueError(
                f"the service scores each /get_reward request alone, but OpenRLHF sends one "
                f"sample per request: start it with --group-size {n_samples_per_prompt}")
        if info.group_size != n_samples_per_prompt:
            raise ValueError(
                f"the service assembles groups of {info.group_size}, OpenRLHF samples "
                f"{n_samples_per_prompt} per prompt: start it with --group-size "
                f"{n_samples_per_prompt}")
    return info


def _client() -> HeroClient:
    """The process's client for the service the environment names."""
    url = os.environ.get("HERO_URL") or DEFAULT_URL
    api_key = os.environ.get("HERO_API_KEY") or None
    return _clients.get((url, api_key), lambda: HeroClient(
        base_url(url), api_key=api_key,
        timeout=float(os.environ.get("HERO_TIMEOUT_S", "300"))))


def reward_func(queries: Sequence[str], prompts: Sequence[str],
                labels: Sequence[Any]) -> dict[str, Any]:
    """OpenRLHF's Python-file reward hook (``--reward.remote_url /path/to/file.py``): the same
    ``/get_reward`` call OpenRLHF's HTTP client makes, with the API key from ``HERO_API_KEY``
    (service URL from ``HERO_URL``). Returns ``{"rewards", "scores", "extra_logs"}``; ``scores``
    are the verdicts. Labels go as the dataset holds them: the service reads a number as its
    text (42 -> "42") and refuses, naming it, a label it cannot use."""
    result = _client().get_reward(list(queries), prompts=list(prompts), labels=list(labels))
    return {"rewards": result.rewards, "scores": result.scores, "extra_logs": result.extra_logs}
