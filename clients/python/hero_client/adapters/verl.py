"""HERO rewards for verl.

verl has two ways to call a custom reward function, and this module has one function for each.

**verl >= 0.8: the reward loop** (``verl.experimental.reward_loop``; the trainer's only path in
0.9). Its reward managers (``naive``, the default) call the function *once per sample*::

    compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)

awaiting it when it is a coroutine function, all samples of a batch concurrently (or each as its
rollout finishes, on a random reward-loop worker). HERO needs the whole group, so
:func:`compute_score` (async) sends each sample as a *piece* of its group: a one-response
``/v1/rewards`` group with ``group_key`` (the prompt's key, below) and ``group_size`` = ``n``.
The service (any replica sharing its group store) assembles the pieces, scores the whole group
once and answers each call with its own sample's reward; no ``--group-size`` is needed. Configure
verl with::

    # hero_verl.py holds one line: from hero_client.adapters.verl import compute_score
    reward.custom_reward_function.path=/path/to/hero_verl.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.url=http://hero:8000
    +reward.custom_reward_function.reward_kwargs.n='${actor_rollout_ref.rollout.n}'
    +reward.custom_reward_function.reward_kwargs.run='${trainer.experiment_name}'

``n`` (required for pieces) is the group size; ``run`` names the service's sigma-bar series the
groups are weighted with (default: env ``HERO_RUN``, else ``default``): one per training run, so
two runs on one service do not share it. ``mode``, ``verifier`` and ``params`` pass through as in
:func:`compute_score_batch`. The first call for a service checks (once per process and URL) that
its ``/v1/info`` reports a group store, i.e. that it assembles pieces.

A prompt sampled again in a later step (verl's ``index`` recurs every epoch) reuses its key: the
service opens the key's *next* group once the previous one has closed, and a response delivered
earlier never counts again, so each step's n samples form a group of their own. Two copies of one
prompt in the *same* batch share a key too and are grouped by arrival, n at a time.

Without ``n`` the adapter falls back to posting each sample to ``/get_reward``, which assembles
groups only on a service started with ``--group-size`` = ``actor_rollout_ref.rollout.n``. A
service without it would score every sample as a group of one: the RM's signal normalised away,
sigma 0, silently. So that path **raises** ``ValueError`` on its first call when the service
assembles no groups ("start it with --group-size N, or pass reward_kwargs.n so the adapter
sends pieces"). :func:`check_service` makes the same checks before a run.

**Validation.** verl scores its validation set with the same function and ``reward_kwargs`` but
``actor_rollout_ref.rollout.val_kwargs.n`` samples per prompt (default 1), and tells the reward
function nothing about it but the dataset's ``extra_info``. A sample whose ``extra_info["split"]``
is not ``train`` (verl's example preprocessing writes ``train``/``test``) is a validation sample:
its group size is ``val_n`` (``reward_kwargs.val_n``, default 1; set it to
``'${actor_rollout_ref.rollout.val_kwargs.n}'`` when that is above 1). With ``val_n`` = 1 the
sample is scored alone, at once (no waiting for a group of ``n``); above 1 its pieces go to the
sigma-bar series ``<run>/validation``, so validation never moves training's sigma-bar.

Set the service's ``--group-timeout-s`` above the time between the first and the last sample of
a group reaching the reward loop; a group still incomplete then is scored as it is and flagged
(``hero_partial`` = 1, logged once).

**verl's BatchRewardManager** (``verl/workers/reward_manager/batch.py``; the trainer's
``reward_model.reward_manager=batch`` before the reward loop, still shipped in 0.9) calls the
function once per batch::

    compute_score(data_sources=..., solution_strs=..., ground_truths=..., extra_infos=..., **kwargs)

and :func:`compute_score_batch` scores the batch's groups in one ``/v1/rewards`` call with a
client-side running sigma-bar.

**Which samples form a group.** verl passes no prompt and no group id to reward functions, only
what the dataset put into ``extra_info``. Put there, when you preprocess the data:

- ``index`` (verl's example preprocessing scripts already do) or ``uid``: a per-prompt id. The
  samples of one prompt share it, so they form one group.
- ``question`` or ``prompt``: the prompt text (a string or chat messages), which the service's RM
  scores the response against (the gsm8k example script already writes ``question``).

Without an id, samples are grouped by (data_source, prompt text, ground_truth); without the
prompt text too, by (data_source, ground_truth) — two prompts with the same answer in one batch
then merge into one group, and the RM sees no prompt.

Both functions return a dict per sample: ``score`` (the HERO reward, or with
``output="advantages"`` the HERO advantage — batch path only) and numeric ``hero_*`` fields
(verified, RM score, weight, sigma-bar, partial, and the verifier-RM disagreement flags
``hero_likely_false_negative`` / ``hero_likely_false_positive``, 1.0 or 0.0: see
``hero_client.diagnostics``) that verl keeps as reward extra info; every dict has the same keys,
as verl requires. **The weight cancels under verl's default GRPO estimator**
(``algorithm.norm_adv_by_std_in_grpo=True`` divides by the group std): set
``algorithm.norm_adv_by_std_in_grpo=False`` (Dr. GRPO), or use ``algorithm.adv_estimator=rloo``.
With ``norm_adv_by_std_in_grpo=False`` and ``output="advantages"``, verl's advantage is exactly
HERO's (HERO advantages have mean 0 per group).

URL and key come from keyword arguments (``reward_kwargs`` in verl's config) or the environment
(``HERO_URL``, ``HERO_API_KEY``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

from .._client import DEFAULT_URL, AsyncHeroClient, HeroClient, ParamsLike
from .._errors import HeroConnectionError
from .._retry import RetryPolicy
from .._sigma import RunningSigma
from ..schema import Group, InfoResponse, Mode, VerifierName
from ..vocabulary import DISAGREEMENT_KINDS, DisagreementKind
from ._shared import LoopCache, ProcessCache, wire_messages

logger = logging.getLogger(__name__)

ID_KEYS = ("uid", "index")
PROMPT_KEYS = ("prompt", "question")
MAX_GROUP_KEY_CHARS = 256  # the wire contract's limit on /v1/rewards group_key
DEFAULT_RUN = "default"

_clients: ProcessCache[HeroClient] = ProcessCache()
_async_clients: LoopCache[AsyncHeroClient] = LoopCache(close=AsyncHeroClient.aclose)
_warned: set[str] = set()
# Services that passed the first-call check, per (base URL, what was checked): once per process.
_checked: set[tuple[str, str]] = set()
# One check at a time per event loop, so a batch's concurrent first calls make one request.
_check_locks: LoopCache[asyncio.Lock] = LoopCache()


def _url_and_key(url: Optional[str], api_key: Optional[str]) -> tuple[str, Optional[str]]:
    """The service's base URL and API key: the arguments, else the environment's."""
    return (url or os.environ.get("HERO_URL") or DEFAULT_URL).rstrip("/"), \
        api_key or os.environ.get("HERO_API_KEY") or None


def client_for(url: Optional[str] = None, api_key: Optional[str] = None,
               timeout: float = 300.0) -> HeroClient:
    """The process's client (with its running sigma-bar) for this service."""
    base, key = _url_and_key(url, api_key)
    return _clients.get((base, key), lambda: HeroClient(
        base, api_key=key, timeout=timeout, running_sigma=RunningSigma()))


def _async_client_for(url: Optional[str], api_key: Optional[str],
                      timeout: float) -> AsyncHeroClient:
    """This event loop's client for the service (see :class:`LoopCache`). Each call holds its
    connection until its whole group is scored: with a cap (httpx's default is 100) the 101st
    sample would queue behind samples waiting for it, and groups spread over more calls in
    flight would close partial at the deadline. So no cap; the service bounds waiting samples
    itself (429 beyond --max-queued-rollouts, retried)."""
    base, key = _url_and_key(url, api_key)
    return _async_clients.get((base, key), lambda: AsyncHeroClient(
        base, api_key=key, timeout=timeout, max_connections=None))


def _warn_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.log(level, message)


def _rollout_n(n: Any) -> Optional[int]:
    if n is None:
        return None
    try:
        value = int(n)  # a resolved hydra interpolation may arrive as a string
    except (TypeError, ValueError):
        raise ValueError(f"n (reward_kwargs.n, the rollout's samples per prompt) must be an "
                         f"integer, got {n!r}") from None
    if value < 1:
        raise ValueError(f"n (reward_kwargs.n) must be >= 1, got {value}")
    return value


def group_size_problem(info: InfoResponse, base: str) -> Optional[str]:
    """Why the service's ``/get_reward`` group assembly does not fit verl's per-sample reward
    loop (None: fits): the path :func:`compute_score` takes without ``n``, so the rollout's
    size is unknown and only a service that assembles no groups at all can be caught."""
    if info.group_size:
        return None
    return (f"the service at {base} scores each /get_reward request alone (it was started "
            f"without --group-size), but verl's reward loop sends one sample per call: each "
            f"sample would be a group of one, its RM signal normalised away and sigma 0: "
            f"start it with --group-size N (N = actor_rollout_ref.rollout.n), or pass "
            f"reward_kwargs.n so the adapter sends pieces")


def pieces_problem(info: InfoResponse, base: str) -> Optional[str]:
    """Why the service cannot assemble ``/v1/rewards`` pieces (None: it can). A service with a
    group store reports it in ``/v1/info``; one without predates pieces and would score each
    sample as a whole group of one."""
    if info.group_store:
        return None
    return (f"the service at {base} (version {info.version}) reports no group store in its "
            f"/v1/info, so it does not assemble /v1/rewards pieces: each sample would be scored "
            f"as a group of one; upgrade it, or drop reward_kwargs.n and start it with "
            f"--group-size N (N = actor_rollout_ref.rollout.n)")


def _service_problem(info: InfoResponse, n: Optional[int], base: str) -> Optional[str]:
    # With n the adapter sends pieces (the service's --group-size does not matter); without,
    # it relies on /get_reward's --group-size.
    return pieces_problem(info, base) if n is not None else group_size_problem(info, base)


def check_service(url: Optional[str] = None, n: Optional[int] = None, *,
                  api_key: Optional[str] = None, timeout: float = 10.0) -> InfoResponse:
    """Check that verl's per-sample reward loop can use the service at ``url``
    (:func:`compute_score`): it answers, and it assembles groups across requests. With ``n``
    (``actor_rollout_ref.rollout.n``, what ``compute_score`` gets as ``reward_kwargs.n``) the
    adapter sends pieces, so the service must support them (any ``--group-size``); without,
    it must have been started with ``--group-size``. Returns the service's info; raises
    ``ValueError`` saying what to change otherwise. The batch path (:func:`compute_score_batch`)
    sends whole groups and needs neither."""
    base, key = _url_and_key(url, api_key)
    n = _rollout_n(n)
    try:
        with HeroClient(base, api_key=key, timeout=timeout,
                        retry=RetryPolicy(max_attempts=2)) as client:
            info = client.info()
    except HeroConnectionError as exc:
        raise ValueError(f"no hero-rewards service answers at {base}: {exc}") from exc
    problem = _service_problem(info, n, base)
    if problem is not None:
        raise ValueError(problem)
    return info


async def _ensure_groups_assemble(client: AsyncHeroClient, base: str, n: Optional[int]) -> None:
    """check_service for compute_score, on first use per (URL, path); a refusal is not cached,
    so a service restarted with the right settings is accepted."""
    slot = (base, "pieces" if n is not None else "get_reward")
    if slot in _checked:
        return
    async with _check_locks.get("first-call check", asyncio.Lock):
        if slot in _checked:  # another sample of the batch checked while this one waited
            return
        problem = _service_problem(await client.info(), n, base)
        if problem is not None:
            logger.error("hero verl adapter: %s", problem)
            raise ValueError(problem)
        _checked.add(slot)


def prompt_of(extra_info: Optional[Mapping[str, Any]]) -> Any:
    """The prompt the dataset put into extra_info (``prompt`` or ``question``: text, or chat
    messages in the wire format), or None."""
    info = extra_info or {}
    for k in PROMPT_KEYS:
        value = info.get(k)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (list, tuple)) and value:
            return wire_messages(value)
    return None


def prompt_as_text(prompt: Any) -> str:
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def group_key(data_source: Any, ground_truth: Any, extra_info: Optional[Mapping[str, Any]]) -> str:
    """The key that puts the samples of one prompt together (see the module docstring)."""
    info = extra_info or {}
    for k in ID_KEYS:
        if info.get(k) is not None:
            return json.dumps(["id", str(data_source), str(info[k])])
    prompt = prompt_of(info)
    if prompt is None:
        _warn_once("hero verl adapter: extra_info has no 'index'/'uid' and no 'question'/'prompt'; "
                   "grouping samples by (data_source, ground_truth)")
    return json.dumps(["text", str(data_source), prompt_as_text(prompt), str(ground_truth)])


def _reference(ground_truth: Any) -> Optional[str]:
    if ground_truth is None:
        return None
    if isinstance(ground_truth, (list, tuple)):  # some verl datasets keep a list of answers
        return str(ground_truth[0]) if ground_truth else None
    return str(ground_truth)


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
    *,
    url: Optional[str] = None,
    api_key: Optional[str] = None,
    mode: Mode = "hero",
    verifier: Optional[VerifierName] = None,
    params: ParamsLike = None,
    output: Literal["rewards", "advantages"] = "rewards",
    timeout: float = 300.0,
    **_: Any,
) -> list[dict[str, float]]:
    """verl ``BatchRewardManager`` reward function: one dict per sample, in input order."""
    n = len(solution_strs)
    infos = list(extra_infos) if extra_infos is not None else [None] * n
    if not (len(data_sources) == len(ground_truths) == len(infos) == n):
        raise ValueError(f"batch lengths differ: {len(data_sources)} data_sources, {n} "
                         f"solution_strs, {len(ground_truths)} ground_truths, "
                         f"{len(infos)} extra_infos")
    if output not in ("rewards", "advantages"):
        raise ValueError(f"output must be 'rewards' or 'advantages', got {output!r}")
    if n == 0:
        return []
    slots: dict[str, int] = {}
    members: list[list[int]] = []
    for i in range(n):
        g = slots.setdefault(group_key(data_sources[i], ground_truths[i], infos[i]), len(members))
        if g == len(members):
            members.append([])
        members[g].append(i)
    groups = [Group(id=str(g), prompt=prompt_of(infos[idx[0]]) or "",
                    reference=_reference(ground_truths[idx[0]]),
                    responses=[solution_strs[i] for i in idx])
              for g, idx in enumerate(members)]
    result = client_for(url, api_key, timeout).score(groups, mode=mode, verifier=verifier,
                                                     params=params)
    out: list[Optional[dict[str, float]]] = [None] * n
    for idx, group in zip(members, result.groups):
        for j, i in enumerate(idx):
            reward = group.rewards[j]
            advantage = group.advantages[j] if group.advantages is not None else 0.0
            out[i] = {
                "score": advantage if output == "advantages" else reward,
                "hero_reward": reward,
                "hero_advantage": advantage,
                "hero_verified": 1.0 if group.verified[j] else 0.0,
                "hero_rm_score": group.rm_scores[j] if group.rm_scores is not None else 0.0,
                "hero_weight": group.weight,
                "hero_sigma": group.sigma if group.sigma is not None else 0.0,
                "hero_sigma_ref": result.sigma_ref if result.sigma_ref is not None else 0.0,
                "hero_partial": 0.0,
                **flag_fields(group.disagreement[j] if group.disagreement else None),
            }
    return out  # type: ignore[return-value]


def flag_fields(kind: Optional[DisagreementKind]) -> dict[str, float]:
    """The sample's disagreement flag as numbers, one field per kind (verl's reward extra info
    holds numbers; the mean of a field over samples is the share flagged)."""
    return {f"hero_{k}": 1.0 if kind == k else 0.0 for k in DISAGREEMENT_KINDS}


def wire_group_key(key: str) -> str:
    """``key`` as a /v1/rewards ``group_key``: itself, or its hash when it is longer than the
    wire contract allows (text keys carry the whole prompt)."""
    if len(key) <= MAX_GROUP_KEY_CHARS:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _warn_if_unprompted(extra_info: Optional[Mapping[str, Any]], prompt: Any) -> None:
    if prompt is None and any((extra_info or {}).get(k) is not None for k in ID_KEYS):
        _warn_once("hero verl adapter: extra_info has an id but no 'question'/'prompt'; the RM "
                   "scores responses without their prompt")


def _warn_if_partial(partial: bool, base: str) -> None:
    if partial:
        _warn_once(f"hero verl adapter: {base} scored an incomplete group after its "
                   "--group-timeout-s (flagged hero_partial): a group size above the rollout's n, "
                   "or samples of a group reaching the reward loop too far apart?",
                   logging.ERROR)


async def _score_as_piece(client: AsyncHeroClient, base: str, data_source: Any,
                          solution_str: str, ground_truth: Any,
                          extra_info: Optional[Mapping[str, Any]], n: int, run: str,
                          mode: Mode, verifier: Optional[VerifierName],
                          params: ParamsLike) -> dict[str, float]:
    """One sample as a one-response piece of its group: the service answers once the group of
    ``n`` is complete, with this sample's share of the whole group's HERO result."""
    prompt = prompt_of(extra_info)
    _warn_if_unprompted(extra_info, prompt)
    key = wire_group_key(group_key(data_source, ground_truth, extra_info))
    # A group of one is whole as it is: scored at once, not parked in the group store.
    piece = Group(prompt=prompt or "", reference=_reference(ground_truth),
                  responses=[solution_str], group_key=key if n > 1 else None,
                  group_size=n if n > 1 else None)
    response = await client.score([piece], mode=mode, verifier=verifier, params=params, run=run)
    result = response.groups[0]
    _warn_if_partial(result.partial, base)
    return {
        "score": float(result.rewards[0]),
        "hero_verified": 1.0 if result.verified[0] else 0.0,
        "hero_rm_score": float(result.rm_scores[0]) if result.rm_scores is not None else 0.0,
        "hero_weight": float(result.weight),
        "hero_sigma_ref": float(response.sigma_ref) if response.sigma_ref is not None else 0.0,
        "hero_partial": 1.0 if result.partial else 0.0,
        **flag_fields(result.disagreement[0] if result.disagreement else None),
    }


async def _score_through_get_reward(client: AsyncHeroClient, base: str, data_source: Any,
                                    solution_str: str, ground_truth: Any,
                                    extra_info: Optional[Mapping[str, Any]]) -> dict[str, float]:
    """One sample posted to /get_reward, assembled by the service's --group-size."""
    prompt = prompt_of(extra_info)
    group_key(data_source, ground_truth, extra_info)  # warns once if nothing identifies the prompt
    _warn_if_unprompted(extra_info, prompt)
    # /get_reward groups by (prompt, label). The prompt string carries the prompt text when the
    # dataset gave one; a per-prompt id without text still needs a distinct prompt to group by.
    info = extra_info or {}
    ident = next((info[k] for k in ID_KEYS if info.get(k) is not None), None)
    if prompt is not None:
        prompt_text = prompt_as_text(prompt)
    elif ident is not None:
        prompt_text = f"[{data_source} #{ident}]"
    else:
        prompt_text = ""
    response = await client.get_reward([solution_str], prompts=[prompt_text],
                                       labels=[_reference(ground_truth)])
    logs = response.extra_logs

    def first(name: str) -> float:
        value = logs.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        return float(value) if value is not None else 0.0

    _warn_if_partial(bool(first("partial")), base)
    return {
        "score": float(response.rewards[0]),
        "hero_verified": first("verified"),
        "hero_rm_score": first("rm_score"),
        "hero_weight": first("hero_weight"),
        "hero_sigma_ref": first("sigma_ref"),
        "hero_partial": first("partial"),
        **{f"hero_{kind}": first(kind) for kind in DISAGREEMENT_KINDS},
    }


async def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Optional[Mapping[str, Any]] = None,
    *,
    url: Optional[str] = None,
    api_key: Optional[str] = None,
    n: Any = None,
    run: Any = None,
    val_n: Any = 1,
    mode: Mode = "hero",
    verifier: Optional[VerifierName] = None,
    params: ParamsLike = None,
    timeout: float = 300.0,
    **_: Any,
) -> dict[str, float]:
    """verl reward-loop reward function (one sample a call). With ``n`` (``reward_kwargs.n`` =
    ``actor_rollout_ref.rollout.n``) the sample goes to ``/v1/rewards`` as a piece of its group
    of ``n``, weighted with the service's sigma-bar series ``run`` (default: env ``HERO_RUN``,
    else ``default``). Without ``n`` it goes to ``/get_reward`` and needs a service started
    with ``--group-size`` (``mode``, ``verifier``, ``params`` and ``run`` then do not apply).
    The service is checked on first use (``ValueError`` if it cannot assemble groups); the call
    returns when the sample's group is complete (or the service's ``--group-timeout-s`` passed:
    ``hero_partial`` = 1)."""
    rollout_n = _rollout_n(n)
    client = _async_client_for(url, api_key, timeout)
    base = _url_and_key(url, api_key)[0]
    await _ensure_groups_assemble(client, base, rollout_n)
    if rollout_n is None:
        return await _score_through_get_reward(client, base, data_source, solution_str,
                                               ground_truth, extra_info)
    series = str(run) if run is not None else os.environ.get("HERO_RUN") or DEFAULT_RUN
    if is_validation(extra_info):
        rollout_n = _rollout_n(val_n) or 1
        series = f"{series}/validation"
    return await _score_as_piece(client, base, data_source, solution_str, ground_truth,
                                 extra_info, rollout_n, series, mode, verifier, params)


def is_validation(extra_info: Optional[Mapping[str, Any]]) -> bool:
    """A sample of verl's validation set: its dataset row says a split other than train."""
    split = (extra_info or {}).get("split")
    return isinstance(split, str) and split.strip().lower() not in ("", "train", "training")
