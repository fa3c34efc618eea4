"""OpenRLHF remote-RM compatibility: ``/get_reward`` payloads to HERO groups and back.

What OpenRLHF 0.11 sends (``openrlhf/utils/agent.py`` ``SingleTurnAgentExecutor``), one sample
per request: ``{"query": [q], "prompts": [p], "labels": [l]}`` where ``q`` =
``tokenizer.decode(prompt ids + response ids, skip_special_tokens=False)``. So:

- **Groups.** Queries sharing a (prompt, label) form one group; with a group size
  (``--group-size`` or ``?n=``) the queries of one group arrive in separate requests, possibly at
  other replicas: each (prompt, label) of a request is a piece of its group, assembled in the
  group store by ``assembly.py``, which gives every caller its own response's reward.
  OpenRLHF cannot send sigma_ref, so the run's server-side running mean from the store is used
  (``?run=`` names the series, default ``default``).
- **Member ids.** Base id digest(run, n, prompt, label, query); the join makes it ``#k``, k the
  first index whose attachment lease no live request holds (a request that finds an earlier id
  held by a live lease waits one lease before it picks, so a dead replica's lease lapses first
  and its caller's retry re-attaches). Two identical samples, which OpenRLHF sends as two
  identical bodies, are two members; a re-sent body (the first attempt's client gone, or its
  replica dead and the lease lapsed) re-attaches to its member. A member whose answer was
  delivered keeps its id taken for the result TTL, so the same (prompt, label, query) sampled
  again in a later step is a new member. Limitation: a request answered on the server whose
  reply was lost on the wire, then re-sent, counts as a new member (it opens the next group).
- **The response** is the query with its prompt prefix removed. A query that does not start with
  its prompt (OpenRLHF cuts over-long prompts from the left; ``clean_up_tokenization_spaces``
  and other lossy decodes change the text) is counted (``hero_get_reward_prompt_mismatch_total``)
  and flagged (``extra_logs["prompt_mismatch"] = 1.0``), and its response is found from the
  prompt's end: after the last occurrence of a rendered prompt's generation header
  (``<|im_start|>assistant\\n``), or the first of a plain prompt's last 32 characters, within the
  prompt's length (+8) of the query's start (``fallback="prompt_tail"``). Failing that, the whole
  query is scored as the response (``fallback="whole_query"``): the verifiers read the final
  answer from its end, and the RM sees the question text twice rather than not at all.
- **EOS text.** The policy's trailing EOS/pad text (``<|im_end|>``, ``<|endoftext|>``...) is
  removed from each response before it goes anywhere (``special_tokens.py``,
  ``--strip-special-tokens``).
- **Pre-rendered prompts** (``--data.apply_chat_template``) are parsed back into chat messages
  for the RM, which renders them with its own template (``reward_models/templates.py``): never
  templated twice. The grouping key stays the prompt as sent.
- **Labels** may be JSON numbers (the schema makes 42 the reference "42"). A blank or missing
  label where the verifier (or the RM) needs a reference is a 422 naming ``labels[i]``: OpenRLHF
  sends ``""`` when ``--data.label_key`` is not set, which would otherwise score as ``no_answer``.
- **The answer.** ``rewards`` are HERO rewards; ``scores`` are the verdicts (1.0 verified, else
  0.0), because OpenRLHF reads ``scores`` as a [0, 1] value for dynamic filtering. ``extra_logs``
  hold numbers only, one per query (OpenRLHF makes a tensor of each), the disagreement flags
  (``GroupResult.disagreement``) as 1.0/0.0 per kind. An empty request gets empty lists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from hero_client.schema import (
    GetRewardRequest,
    GetRewardResponse,
    Group,
    GroupResult,
    RewardsRequest,
)
from hero_client.vocabulary import DisagreementKind

from .. import special_tokens
from ..assembly import DEFAULT_RUN, Assembler, Piece, StopCheck, outcome_sigma_ref
from ..errors import InputError
from ..group_store import GroupKey, stable_digest
from ..reward_models import templates

# The prompt as decoded inside a query is never much longer than the prompt sent with it (left
# truncation and clean-up only shorten it; a tokenizer may add a leading space).
PROMPT_SLACK_CHARS = 8
LOG_KEYS = ("verified", "rm_score", "hero_weight", "sigma_ref", "partial", "prompt_mismatch",
            "likely_false_negative", "likely_false_positive")

RMPrompt = Union[str, list[dict[str, str]]]


@dataclass(frozen=True)
class LocatedResponse:
    text: str
    fallback: Optional[str]  # None: the query started with its prompt


def locate_response(query: str, prompt: str) -> LocatedResponse:
    """Where the response starts in ``query`` (see the module docstring)."""
    if query.startswith(prompt):
        return LocatedResponse(query[len(prompt):], None)
    window = len(prompt) + PROMPT_SLACK_CHARS
    anchor = templates.generation_anchor(prompt)
    # A rendered prompt's header may occur earlier too (multi-turn): take the last in the window.
    # A plain prompt's tail is likelier restated early in the response: take the first.
    at = (query.rfind(anchor, 0, window) if templates.looks_rendered(prompt)
          else query.find(anchor, 0, window))
    if anchor and at >= 0:
        return LocatedResponse(query[at + len(anchor):], "prompt_tail")
    return LocatedResponse(query, "whole_query")


def reward_model_prompt(prompt: str) -> RMPrompt:
    """Chat messages for a prompt rendered in a known chat format, else the prompt unchanged
    (plain text; or rendered but unparseable, which the hf backend scores verbatim)."""
    messages = templates.prompt_messages(prompt)
    return messages if messages is not None else prompt


@dataclass(frozen=True)
class QueryGroup:
    prompt: str
    label: Optional[str]
    responses: list[str]
    positions: list[int]  # where each response's query sits in the request


@dataclass(frozen=True)
class SplitRequest:
    groups: list[QueryGroup]
    fallbacks: list[Optional[str]]  # per query: how its response was found, None if normally


def split_by_prompt(request: GetRewardRequest, strip: special_tokens.Stripper) -> SplitRequest:
    groups: dict[tuple[str, Optional[str]], QueryGroup] = {}
    fallbacks = []
    for i, query in enumerate(request.query):
        prompt = request.prompts[i] if request.prompts is not None else ""
        label = request.labels[i] if request.labels is not None else None
        located = locate_response(query, prompt)
        fallbacks.append(located.fallback)
        group = groups.setdefault((prompt, label), QueryGroup(prompt, label, [], []))
        group.responses.append(strip(located.text))
        group.positions.append(i)
    return SplitRequest(list(groups.values()), fallbacks)


@dataclass(frozen=True)
class QueryResult:
    """One query's share of its (whole or assembled) group."""

    group: GroupResult
    index: int
    sigma_ref: Optional[float]  # the sigma-bar the group was weighted with
    partial: bool


def build_response(results: list[QueryResult],
                   fallbacks: list[Optional[str]]) -> GetRewardResponse:
    """Per-query rewards and verdicts; OpenRLHF turns every extra_logs entry into a tensor, so
    they are numbers only, one per query."""
    rewards = [r.group.rewards[r.index] for r in results]
    verified = [float(r.group.verified[r.index]) for r in results]
    extra_logs = {
        "verified": verified,
        "rm_score": [r.group.rm_scores[r.index] if r.group.rm_scores else 0.0 for r in results],
        "hero_weight": [r.group.weight for r in results],
        "sigma_ref": [r.sigma_ref or 0.0 for r in results],
        "partial": [float(r.partial) for r in results],
        "prompt_mismatch": [float(f is not None) for f in fallbacks],
        "likely_false_negative": [_flagged(r, "likely_false_negative") for r in results],
        "likely_false_positive": [_flagged(r, "likely_false_positive") for r in results],
    }
    assert set(extra_logs) == set(LOG_KEYS)
    return GetRewardResponse(rewards=rewards, scores=list(verified), extra_logs=extra_logs)


def _flagged(result: QueryResult, kind: DisagreementKind) -> float:
    flags = result.group.disagreement
    return float(flags is not None and flags[result.index] == kind)


def member_base_id(run: str, n: int, prompt: str, label: Optional[str], query: str) -> str:
    return stable_digest("get_reward", run, n, prompt, label, query)


class GetRewardScorer:
    """Scores /get_reward traffic: request by request, or assembled in the group store."""

    def __init__(self, assembler: Assembler, group_size: int) -> None:
        self.assembler = assembler
        self.pipeline = assembler.pipeline
        self.group_size = group_size

    def check_labels(self, request: GetRewardRequest) -> None:
        """A reference is required per query where the verifier or the RM needs one."""
        settings = self.pipeline.settings
        verifier = self.pipeline.verifiers[settings.verifier]
        model = self.pipeline.reward_model
        if verifier.needs_reference:
            why = f"the {verifier.name!r} verifier needs a reference answer"
        elif model.needs_reference:
            why = f"reward model {model.model_id!r} scores against a reference"
        else:
            return
        if request.labels is None:
            raise InputError(f"{why}: send labels (OpenRLHF: --data.label_key)", "labels")
        for i, label in enumerate(request.labels):
            if label is None or not label.strip():
                what = "null" if label is None else "empty"
                raise InputError(
                    f"labels[{i}] is {what}, but {why} (OpenRLHF sends \"\" when "
                    "--data.label_key is not set)", f"labels[{i}]")

    async def score(self, request: GetRewardRequest, *, n: Optional[int] = None,
                    run: str = DEFAULT_RUN,
                    should_stop: Optional[StopCheck] = None,
                    ) -> GetRewardResponse:
        """``n`` overrides ``--group-size`` (0: score each request whole); ``should_stop`` is
        polled while the request waits for its group (see ``assembly.py``)."""
        if not request.query:
            return GetRewardResponse(rewards=[], scores=[], extra_logs={k: [] for k in LOG_KEYS})
        self.check_labels(request)
        settings = self.pipeline.settings
        strip = special_tokens.stripper(settings.strip_special_tokens,
                                        settings.extra_special_tokens)
        split = split_by_prompt(request, strip)
        for fallback in split.fallbacks:
            if fallback is not None:
                self.pipeline.metrics.prompt_mismatches.labels(fallback).inc()
        groups = RewardsRequest(groups=[
            Group(id=str(g), prompt=reward_model_prompt(q.prompt), reference=q.label,
                  responses=q.responses) for g, q in enumerate(split.groups)])
        size = self.group_size if n is None else n
        results: list[Optional[QueryResult]] = [None] * len(request.query)
        if size <= 0:
            scored = await self.assembler.score_whole(groups, run)
            for q, group in zip(split.groups, scored.groups):
                for index, position in enumerate(q.positions):
                    results[position] = QueryResult(group, index, scored.sigma_ref, False)
        else:
            pieces = [Piece(g, GroupKey.for_prompt(run, q.prompt, q.label, size),
                            [member_base_id(run, size, q.prompt, q.label, request.query[p])
                             for p in q.positions])
                      for g, q in enumerate(split.groups)]
            joined = await self.assembler.join(groups, pieces, run, should_stop, field="query")
            for q, outcomes in zip(split.groups, joined.outcomes):
                for position, outcome in zip(q.positions, outcomes):
                    results[position] = QueryResult(outcome.group, outcome.index,
                                                    outcome_sigma_ref(outcome), outcome.partial)
        assert all(r is not None for r in results)
        return build_response(results, split.fallbacks)  # type: ignore[arg-type]
