"""The scoring pipeline: validate → dedupe → fan out (verifier pool ‖ RM batcher) → HERO combine.

Nothing here knows about HTTP; the routes turn requests into calls of :meth:`Pipeline.score`."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

from hero_client import diagnostics, hero
from hero_client.schema import (
    Group,
    GroupResult,
    Mode,
    RewardsRequest,
    RewardsResponse,
    Timings,
    VerifierStatus,
)

from . import special_tokens
from .admission import Admission, Permit
from .audit import AuditLog, flagged_entries
from .batching import Batcher
from .config import Settings
from .errors import InputError, ScoringFailed, ScoringUnavailable
from .metrics import Metrics
from .reward_models import RewardModel, RewardModelError, ScoringItem
from .reward_models.base import RewardModelUnavailable
from .verifiers import Verdict, Verifier

log = logging.getLogger(__name__)


@dataclass
class RewardModelScores:
    """One group's RM scores (from the batcher, or sent with the group)."""

    scores: list[float]
    truncated: list[bool]
    queue_ms: float


@dataclass(frozen=True)
class LocalScores:
    """A request's per-response results before HERO combines them (one entry per group)."""

    verifier: Verifier
    verdicts: list[list[Verdict]]
    rm_results: list[Optional[RewardModelScores]]
    verify_ms: float
    rm_ms: float
    n_rollouts: int

    def timings(self, started: float) -> Timings:
        return Timings(
            queue=max((r.queue_ms for r in self.rm_results if r is not None), default=0.0),
            verifier=self.verify_ms, reward_model=self.rm_ms,
            total=(time.perf_counter() - started) * 1000.0)

    def only(self, groups: Sequence[int]) -> LocalScores:
        """The results of the groups at these positions (a sub-request of them)."""
        return replace(self, verdicts=[self.verdicts[g] for g in groups],
                       rm_results=[self.rm_results[g] for g in groups])


def combine_group(mode: Mode, params: hero.HeroParams, group_id: str,
                  statuses: Sequence[VerifierStatus], rm_scores: Optional[list[float]],
                  truncated: list[bool], sigma_ref: Optional[float]) -> GroupResult:
    """HERO (or the ablation ``mode``) for one whole group, with its verifier/RM disagreements:
    pure, shared by requests scored whole and by groups closed in the group store."""
    verified = [s == "correct" for s in statuses]
    result = hero.score_group(mode, verified, rm_scores, params, sigma_ref)
    return GroupResult(
        id=group_id, sigma=result.sigma, weight=result.weight, rewards=result.rewards,
        advantages=result.advantages, verified=verified, verifier_status=list(statuses),
        rm_scores=rm_scores, normalized=result.normalized, truncated=truncated,
        disagreement=diagnostics.disagreements(statuses, rm_scores))


def _unavailable(exc: RewardModelUnavailable) -> ScoringUnavailable:
    """503 + Retry-After: the RM is down as a whole, nothing is wrong with the request."""
    return ScoringUnavailable(str(exc), retry_after_s=max(1, math.ceil(exc.retry_after_s or 1)))


def n_rollouts(request: RewardsRequest) -> int:
    return sum(len(g.responses) for g in request.groups)


def _prompt_value(group: Group) -> str | list[dict[str, str]]:
    if isinstance(group.prompt, str):
        return group.prompt
    return [m.model_dump() for m in group.prompt]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        reward_model: RewardModel,
        batcher: Batcher,
        verifiers: dict[str, Verifier],
        metrics: Metrics,
        admission: Admission,
        audit: Optional[AuditLog] = None,
    ) -> None:
        self.settings = settings
        self.reward_model = reward_model
        self.batcher = batcher
        self.verifiers = verifiers
        self.metrics = metrics
        self.admission = admission
        self.audit = audit  # --audit-log: the flagged responses (None: off)

    # -- validation ------------------------------------------------------------------------

    def check(self, request: RewardsRequest) -> Verifier:
        """Semantic checks the schema cannot express; raises InputError naming the field."""
        s = self.settings
        if len(request.groups) > s.max_groups:
            raise InputError(f"{len(request.groups)} groups; the limit is {s.max_groups}", "groups")
        verifier = self.verifiers[request.verifier or s.verifier]
        needs_rm = request.mode != "verifier"
        for g, group in enumerate(request.groups):
            where = f"groups[{g}]"
            if group.group_size is not None and group.group_size > s.max_responses_per_group:
                raise InputError(
                    f"group_size {group.group_size}; the limit is {s.max_responses_per_group}",
                    f"{where}.group_size")
            if len(group.responses) > s.max_responses_per_group:
                raise InputError(
                    f"{len(group.responses)} responses; the limit is {s.max_responses_per_group}",
                    f"{where}.responses")
            for r, response in enumerate(group.responses):
                if len(response) > s.max_response_chars:
                    raise InputError(
                        f"{len(response)} characters; the limit is {s.max_response_chars}",
                        f"{where}.responses[{r}]")
            if group.reference is None and verifier.needs_reference:
                raise InputError(f"the {verifier.name!r} verifier needs a reference answer",
                                 f"{where}.reference")
            if (needs_rm and group.rm_scores is None and group.reference is None
                    and self.reward_model.needs_reference):
                raise InputError(
                    f"reward model {self.reward_model.model_id!r} scores against a reference; "
                    "send one, or send rm_scores", f"{where}.reference")
        return verifier

    # -- scoring ---------------------------------------------------------------------------

    def admit(self, request: RewardsRequest, field: str = "groups") -> Permit:
        """A permit for the request's rollouts (413 / 429 when there is no room): the caller
        holds it until the request is answered, including any wait for its groups."""
        return self.admission.try_acquire(n_rollouts(request), field)

    async def score(
        self, request: RewardsRequest, sigma_ref: Optional[float] = None
    ) -> RewardsResponse:
        """Score a request of whole groups. ``sigma_ref`` (the server's running mean) applies
        only when the request sends none."""
        started = time.perf_counter()
        verifier = self.check(request)
        with self.admit(request):
            local = await self.score_locally(request, verifier)
        response = self.combine(request, local, sigma_ref)
        response.timings_ms = local.timings(started)
        self.metrics.rollouts_scored.labels(request.mode).inc(local.n_rollouts)
        for group, result in zip(request.groups, response.groups):
            self.metrics.observe_group(request.mode, result)
            self.audit_flagged(request.request_id, result, group.responses)
        return response

    def audit_flagged(self, request_id: Optional[str], result: GroupResult,
                      responses: Sequence[str]) -> None:
        """The caller's flagged responses to the audit log (``result``: its own entries)."""
        if self.audit is not None and result.disagreement:
            self.audit.record(flagged_entries(request_id, result, responses))

    async def score_locally(self, request: RewardsRequest, verifier: Verifier) -> LocalScores:
        """Verifier verdicts and RM scores per response, not combined into HERO rewards: what a
        group assembled across requests and replicas sends to the group store. The caller has
        checked the request (:meth:`check`) and holds its permit (:meth:`admit`)."""
        if request.mode != "verifier" and any(g.rm_scores is None for g in request.groups):
            self._refuse_while_reward_model_down()
        verify_task = asyncio.ensure_future(self._verify(verifier, request.groups))
        rm_task = asyncio.ensure_future(self._reward_model_scores(request))
        # Both run to completion even if one fails, so no work is orphaned.
        outcomes = await asyncio.gather(verify_task, rm_task, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        (verdicts, verify_ms), (rm_results, rm_ms) = outcomes  # type: ignore[misc]
        return LocalScores(verifier, verdicts, rm_results, verify_ms, rm_ms, n_rollouts(request))

    def _refuse_while_reward_model_down(self) -> None:
        """503 at once while the RM's circuit breaker is open: no verifying, no queueing, no
        backend call. Requests that need no RM (rm_scores, mode verifier) never get here."""
        try:
            self.batcher.raise_if_unavailable()
        except RewardModelUnavailable as exc:
            self.metrics.rejected.labels("reward_model_unavailable").inc()
            raise _unavailable(exc) from exc

    async def _verify(
        self, verifier: Verifier, groups: Sequence[Group]
    ) -> tuple[list[list[Verdict]], float]:
        started = time.perf_counter()
        # The policy's trailing EOS/pad text is not part of the answer (special_tokens.py).
        strip = special_tokens.stripper(self.settings.strip_special_tokens,
                                        self.settings.extra_special_tokens)

        async def one(group: Group) -> list[Verdict]:
            responses = [strip(r) for r in group.responses]
            unique = list(dict.fromkeys(responses))  # identical responses verified once
            verdicts = dict(zip(unique, await verifier.verify(group.reference, unique)))
            return [verdicts[r] for r in responses]

        results = list(await asyncio.gather(*(one(g) for g in groups)))
        for verdicts in results:
            for v in verdicts:
                self.metrics.verifier_outcomes.labels(verifier.name, v.status).inc()
        return results, (time.perf_counter() - started) * 1000.0

    async def _reward_model_scores(
        self, request: RewardsRequest
    ) -> tuple[list[RewardModelScores | None], float]:
        """RM scores per group: the client's own, the model's, or None (verifier mode)."""
        started = time.perf_counter()
        results: list[RewardModelScores | None] = [None] * len(request.groups)
        items: list[ScoringItem] = []
        owners: list[int] = []
        for g, group in enumerate(request.groups):
            if group.rm_scores is not None:
                results[g] = RewardModelScores(list(group.rm_scores),
                                               [False] * len(group.responses), 0.0)
            elif request.mode != "verifier":
                prompt = _prompt_value(group)
                items.extend(ScoringItem(prompt, r, group.reference) for r in group.responses)
                owners.extend([g] * len(group.responses))
        if items:
            # Tell the batcher these are coming, so it holds a batch open for them while they
            # are tokenized instead of starting without them.
            self.batcher.announce(len(items))
            try:
                try:
                    encoded = await asyncio.to_thread(self.reward_model.encode, items)
                finally:
                    self.batcher.withdraw(len(items))
                scored = await self.batcher.score(encoded)
            except RewardModelUnavailable as exc:
                raise _unavailable(exc) from exc
            except RewardModelError as exc:
                raise ScoringFailed(str(exc)) from exc
            by_group: dict[int, list[int]] = {}
            for i, owner in enumerate(owners):
                by_group.setdefault(owner, []).append(i)
            for g, idx in by_group.items():
                results[g] = RewardModelScores(
                    scores=[scored[i].score for i in idx],
                    truncated=[encoded[i].truncated for i in idx],
                    queue_ms=max(scored[i].queue_ms for i in idx),
                )
        return results, (time.perf_counter() - started) * 1000.0

    def combine(self, request: RewardsRequest, local: LocalScores,
                running_sigma_ref: Optional[float]) -> RewardsResponse:
        """HERO over the request's whole groups, from their local scores."""
        verdicts, rm_results = local.verdicts, local.rm_results
        p = request.params
        params = p.formula_params()
        sigmas = [hero.group_sigma(r.scores) if r else None for r in rm_results]
        sigma_ref = p.sigma_ref
        if sigma_ref is None:
            sigma_ref = running_sigma_ref
        if sigma_ref is None:
            sigma_ref = hero.default_sigma_ref(sigmas)
        groups = []
        for g, group in enumerate(request.groups):
            rm = rm_results[g]
            groups.append(combine_group(
                request.mode, params, group.id if group.id is not None else str(g),
                [v.status for v in verdicts[g]], rm.scores if rm else None,
                rm.truncated if rm else [False] * len(group.responses), sigma_ref))
        return RewardsResponse(
            request_id=request.request_id,
            mode=request.mode,
            reward_model=self.reward_model.model_id,
            verifier=local.verifier.name,
            sigma_ref=sigma_ref,
            groups=groups,
        )
