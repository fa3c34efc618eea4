"""HERO rewards for TRL's ``GRPOTrainer``.

    from trl import GRPOConfig, GRPOTrainer
    from hero_client.adapters.trl import HeroRewardFunction

    reward = HeroRewardFunction("http://127.0.0.1:8000", num_generations=8)
    trainer = GRPOTrainer(model=..., reward_funcs=reward, train_dataset=dataset,   # "answer" column
                          args=GRPOConfig(num_generations=8, scale_rewards="batch", ...))

TRL (1.x) calls a reward function as ``f(prompts=..., completions=..., completion_ids=...,
trainer_state=..., log_metric=..., log_extra=..., **dataset_columns)`` with one item per
completion, the ``num_generations`` completions of a prompt consecutive, and takes back one float
per completion. This object puts consecutive completions of the same (prompt, reference) into one
HERO group (split into groups of ``num_generations`` if given), takes the reference from a dataset
column, sends the groups to the service with a running sigma-bar (``RunningSigma``, kept per
process), and returns the HERO ``rewards`` (default) or ``advantages``.

**The weight cancels under TRL's default ``scale_rewards="group"``**: TRL computes
A = (R - mean_group(R)) / std_group(R), in which HERO's per-group weight w cancels exactly. Feed
``rewards`` with ``scale_rewards="batch"`` (one std for the whole batch) or ``"none"`` (no std;
Dr. GRPO), where w survives; or ``output="advantages"`` with ``scale_rewards="none"``: HERO's
advantages have mean 0 per group, so TRL's mean subtraction leaves them as they are and its
advantage *is* HERO's (w applied after the group normalisation). TRL does not pass its config
to reward functions, so the adapter cannot check ``scale_rewards`` for you.

Conversational datasets work too: chat prompts are sent as chat messages, and a completion's
text is its assistant message(s).

**Several processes** (``accelerate launch`` / ``torchrun``): each process scores its own
contiguous slice of the global generation batch, and TRL's slices cut a group in two when
``per_device_train_batch_size * steps_per_generation`` is not a multiple of ``num_generations``.
With ``num_generations`` set and ``WORLD_SIZE`` > 1 (or any span shorter than
``num_generations``), the groups go to the service as *pieces*: ``group_key`` names the group
the same way on every process (a digest of the call number, ``trainer_state.global_step``, the
group's index in the global batch, found from ``RANK`` and the slice length, its prompt and
reference, and the function's ``name``), ``group_size`` is ``num_generations``. The service
waits for the other pieces (on any replica; ``--group-store redis://...`` behind several),
scores the whole group once, and each process gets its own completions' rewards, all with
the same weight. Every group of such a call is sent as a piece, so all are weighted with one
sigma-bar: the service's running mean of the series ``run`` (default ``$HERO_RUN`` or
``default``; give each concurrent training run its own), not the per-process ``RunningSigma``.
``pieces=True/False`` forces the choice. A group the service had to score incomplete (its
other piece did not arrive within the service's ``--group-timeout-s``) is counted in
``hero/partial_groups``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

from .._client import DEFAULT_URL, HeroClient, ParamsLike
from .._sigma import RunningSigma
from ..schema import Group, Mode, RewardsResponse, VerifierName
from ..vocabulary import DISAGREEMENT_KINDS
from ._shared import message_text, wire_messages

logger = logging.getLogger(__name__)

REFERENCE_COLUMNS = ("answer", "solution", "reference")
Output = Literal["rewards", "advantages"]


def prompt_for_service(prompt: Any) -> Union[str, list[dict[str, str]]]:
    """A TRL prompt (standard: a string; conversational: a list of messages) in the wire
    format. Roles other than system/user/assistant (e.g. tool) are sent as user messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        return wire_messages(prompt)
    return str(prompt)


def completion_text(completion: Any) -> str:
    """A TRL completion as the response text: the string itself, or the content of its
    assistant message(s) (all messages if none is marked assistant)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role") == "assistant"] or messages
        return "\n".join(message_text(m.get("content")) for m in assistant)
    return str(completion)


def world_size() -> int:
    """The number of training processes, as torchrun and ``accelerate launch`` set it."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def process_rank() -> int:
    """This process's index among them (``RANK``, as torchrun and accelerate set it)."""
    return int(os.environ.get("RANK") or 0)


def aligned_spans(keys: Sequence[str], num_generations: int,
                  offset: int) -> list[tuple[int, int]]:
    """[start, end) spans of one process's slice of a global batch whose groups start at
    multiples of ``num_generations`` (TRL's ``RepeatSampler``); the slice starts at global
    position ``offset``. A span ends at a group boundary or where the key changes (which only
    a misaligned batch has: those pieces get different group keys, never a mixed group)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or (offset + i) % num_generations == 0 or keys[i] != keys[start]:
            spans.append((start, i))
            start = i
    return spans


def group_spans(keys: Sequence[str], num_generations: Optional[int]) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive equal keys, each cut into pieces of at most
    ``num_generations`` (two groups of the same prompt can be adjacent)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            step = num_generations or (i - start)
            spans.extend((s, min(s + step, i)) for s in range(start, i, step))
            start = i
    return spans


class HeroRewardFunction:
    """A TRL reward function backed by a hero-rewards service. See the module docstring.

    Args:
        url: the service's base URL.
        api_key: bearer key, if the service requires one.
        reference_column: the dataset column with the gold answer; default: the first of
            ``answer``, ``solution``, ``reference`` that the dataset has.
        output: ``"rewards"`` (HERO rewards, w·r̂; use ``scale_rewards="batch"`` or ``"none"``)
            or ``"advantages"`` (HERO advantages; use ``scale_rewards="none"``).
        num_generations: TRL's ``num_generations``; cuts runs of one prompt into groups of
            this size. Default: a run of equal consecutive prompts is one group.
        mode, verifier, params: as in ``HeroClient.score`` (``params`` e.g.
            ``{"advantage": "dr_grpo", "alpha": 0.05}``); ``params.sigma_ref`` unset means the
            running sigma-bar.
        running_sigma: the sigma-bar state (default: a new ``RunningSigma()``).
        client: a ``HeroClient`` to use instead of building one from ``url``/``api_key``.
        name: the ``__name__`` TRL logs this function under (``rewards/<name>/mean``) and the
            prefix of the extra metrics (``<name>/weight``, ``<name>/sigma_ref``, the share of
            completions flagged ``<name>/likely_false_negative`` / ``_positive``, ...) and of
            the completion table's extra columns (``<name>_status``, ``<name>_disagreement``).
        pieces: send groups as pieces the service assembles across processes (see the module
            docstring): ``None`` (default) when ``WORLD_SIZE`` > 1 or a span is short, or
            always (``True``) or never (``False``). Needs ``num_generations``.
        run: the service's sigma-bar series for pieces (default ``$HERO_RUN`` or ``default``).
        process_index: this process's index in the global batch (default ``$RANK``).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: Optional[str] = None,
        reference_column: Optional[str] = None,
        output: Output = "rewards",
        num_generations: Optional[int] = None,
        mode: Mode = "hero",
        verifier: Optional[VerifierName] = None,
        params: ParamsLike = None,
        running_sigma: Optional[RunningSigma] = None,
        client: Optional[HeroClient] = None,
        timeout: float = 120.0,
        name: str = "hero",
        pieces: Optional[bool] = None,
        run: Optional[str] = None,
        process_index: Optional[int] = None,
    ) -> None:
        if output not in ("rewards", "advantages"):
            raise ValueError(f"output must be 'rewards' or 'advantages', got {output!r}")
        if num_generations is not None and num_generations < 1:
            raise ValueError("num_generations must be >= 1")
        if pieces and num_generations is None:
            raise ValueError("pieces=True needs num_generations (the whole group's size)")
        self.pieces = pieces
        self.run = run or os.environ.get("HERO_RUN") or "default"
        self.process_index = process_index
        self.__name__ = name  # TRL names the reward (and its logged metrics) after __name__
        self.url = url
        self.reference_column = reference_column
        self.output: Output = output
        self.num_generations = num_generations
        self.mode: Mode = mode
        self.verifier = verifier
        self.params = params
        self._owns_client = client is None
        if client is None:
            self.running_sigma = running_sigma if running_sigma is not None else RunningSigma()
            client = HeroClient(url, api_key=api_key, timeout=timeout,
                                running_sigma=self.running_sigma)
        else:  # the client's sigma-bar is the one sent; keep one state, not two
            if running_sigma is not None:
                client.running_sigma = running_sigma
            elif client.running_sigma is None:
                client.running_sigma = RunningSigma()
            self.running_sigma = client.running_sigma
        self.client = client
        self.calls = 0
        self.last_response: Optional[RewardsResponse] = None

    # TRL keeps reward functions for the whole run; close() is for scripts that are done early.
    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> HeroRewardFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _references(self, n: int, columns: Mapping[str, Any]) -> list[Optional[str]]:
        name = self.reference_column
        if name is None:
            name = next((c for c in REFERENCE_COLUMNS if c in columns), None)
        if name is None:
            if self.verifier == "none" or self.mode == "rm":
                return [None] * n
            raise ValueError(
                "HeroRewardFunction needs the gold answer: add an 'answer' (or 'solution') column "
                "to the dataset or pass reference_column=...; dataset columns seen: "
                f"{sorted(k for k in columns if not k.startswith('log_'))}")
        if name not in columns:
            raise ValueError(f"reference column {name!r} is not among the dataset columns "
                             f"{sorted(columns)}")
        values = list(columns[name])
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
        return [None if v is None else str(v) for v in values]

    def build_groups(
        self, prompts: Sequence[Any], completions: Sequence[Any],
        references: Sequence[Optional[str]], trainer_state: Any = None,
    ) -> tuple[list[Group], list[tuple[int, int]]]:
        """The HERO groups of one call, and the [start, end) span of completions each covers
        (in the order of ``completions``); pieces when :meth:`sends_pieces` says so."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        wire_prompts = [prompt_for_service(p) for p in prompts]
        keys = [json.dumps([p, r], sort_keys=True) for p, r in zip(wire_prompts, references)]
        spans = group_spans(keys, self.num_generations)
        as_pieces = self.sends_pieces(spans)
        offset = 0
        if as_pieces:
            assert self.num_generations is not None  # sends_pieces checks it
            offset = self._process_index() * len(completions)
            spans = aligned_spans(keys, self.num_generations, offset)
        groups = [Group(id=f"{self.calls}/{g}", prompt=wire_prompts[s], reference=references[s],
                        responses=[completion_text(c) for c in completions[s:e]],
                        **(self._piece_fields(trainer_state, offset + s, keys[s])
                           if as_pieces else {}))
                  for g, (s, e) in enumerate(spans)]
        return groups, spans

    def _piece_fields(self, trainer_state: Any, global_start: int,
                      prompt_and_reference: str) -> dict[str, Any]:
        assert self.num_generations is not None
        index = global_start // self.num_generations  # the group's index in the global batch
        return {"group_key": self.group_key(trainer_state, index, prompt_and_reference),
                "group_size": self.num_generations}

    def sends_pieces(self, spans: Sequence[tuple[int, int]]) -> bool:
        """Whether this call's groups go as pieces: forced by ``pieces``, else when this is
        one of several processes or a span is shorter than a whole group."""
        if self.num_generations is None or self.pieces is False:
            return False
        if self.pieces:
            return True
        return world_size() > 1 or any(e - s < self.num_generations for s, e in spans)

    def _process_index(self) -> int:
        return process_rank() if self.process_index is None else self.process_index

    def group_key(self, trainer_state: Any, global_index: int, prompt_and_reference: str) -> str:
        """A key every process computes alike for the same group: they make the same calls in
        the same order (the call number; it also tells an eval batch from the training batch
        generated at the same step), share ``global_step`` (which keeps a resumed run's keys
        apart from the first attempt's), and see the group at the same global index."""
        step = getattr(trainer_state, "global_step", None)
        digest = hashlib.sha256(json.dumps(
            [self.__name__, self.calls, step, global_index, prompt_and_reference]).encode())
        return f"trl/{step}/{self.calls}/{global_index}/{digest.hexdigest()[:24]}"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Any = None, trainer_state: Any = None,
                 log_metric: Any = None, log_extra: Any = None, **columns: Any) -> list[float]:
        n = len(completions)
        if n == 0:
            return []
        groups, spans = self.build_groups(prompts, completions, self._references(n, columns),
                                          trainer_state)
        # run names the service's sigma-bar series; only pieces are weighted with it
        as_pieces = groups[0].group_key is not None
        result = self.client.score(groups, mode=self.mode, verifier=self.verifier,
                                   params=self.params, request_id=f"trl/{self.calls}",
                                   run=self.run if as_pieces else None)
        self.calls += 1
        self.last_response = result
        out: list[float] = []
        for group in result.groups:
            values = group.advantages if self.output == "advantages" else group.rewards
            if values is None:
                raise ValueError("output='advantages' needs params.advantage other than 'none'")
            out.extend(values)
        flags = [kind for g in result.groups
                 for kind in (g.disagreement or [None] * len(g.verified))]
        if callable(log_metric):
            self._log(log_metric, result, flags, spans, as_pieces)
        if callable(log_extra):
            log_extra(f"{self.__name__}_status",
                      [s for g in result.groups for s in g.verifier_status])
            log_extra(f"{self.__name__}_disagreement", [kind or "" for kind in flags])
        return out

    def _log(self, log_metric: Any, result: RewardsResponse, flags: Sequence[Optional[str]],
             spans: list[tuple[int, int]], as_pieces: bool) -> None:
        """``flags``: each completion's verifier-RM disagreement flag, in order."""
        name = self.__name__
        groups = result.groups
        weights = [g.weight for g in groups]
        verified = [v for g in groups for v in g.verified]
        log_metric(f"{name}/weight", math.fsum(weights) / len(weights))
        log_metric(f"{name}/verified", sum(verified) / len(verified))
        for kind in DISAGREEMENT_KINDS:
            log_metric(f"{name}/{kind}", flags.count(kind) / len(flags))
        if result.sigma_ref is not None:
            log_metric(f"{name}/sigma_ref", result.sigma_ref)
        sigmas = [g.sigma for g in groups if g.sigma is not None]
        if sigmas:
            log_metric(f"{name}/sigma", math.fsum(sigmas) / len(sigmas))
        if self.num_generations:
            short = sum(1 for s, e in spans if e - s != self.num_generations)
            log_metric(f"{name}/short_groups", float(short))
            if short and not as_pieces:
                logger.warning("%d of %d groups had fewer than num_generations=%d completions "
                               "(a process slice cut a group? pieces=None assembles them)",
                               short, len(spans), self.num_generations)
        if as_pieces:
            partial = sum(1 for g in groups if g.partial)
            log_metric(f"{name}/partial_groups", float(partial))
            if partial:
                logger.warning("%d of %d groups were scored incomplete: their other pieces did "
                               "not reach the service in time (run=%r)", partial, len(groups),
                               self.run)
