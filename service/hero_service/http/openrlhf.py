"""OpenRLHF remote-RM compatibility: ``/get_reward`` payloads to HERO groups and back.

What OpenRLHF 0.11 sends (``openrlhf/utils/agent.py`` ``SingleTurnAgentExecutor``), one sample
per request: ``{"query": [q], "prompts": [p], "labels": [l]}`` where ``q`` =
``tokenizer.decode(prompt ids + response ids, skip_special_tokens=False)``. So:

- **Groups.** Queries sharing a (prompt, label) form one group; with ``--group-size`` the queries
  of one group arrive in separate requests and are assembled (``assembly.py``). OpenRLHF cannot
  send sigma_ref, so the server's running mean is used.
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
  hold numbers only, one per query (OpenRLHF makes a tensor of each). An empty request gets
  empty lists."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Union

from hero_client.schema import GetRewardRequest, GetRewardResponse, Group, RewardsRequest

from .. import special_tokens
from ..assembly import AssembledResult, GroupAssembler, ScoredGroup
from ..errors import InputError
from ..pipeline import Pipeline
from ..reward_models import templates

# The prompt as decoded inside a query is never much longer than the prompt sent with it (left
# truncation and clean-up only shorten it; a tokenizer may add a leading space).
PROMPT_SLACK_CHARS = 8
LOG_KEYS = ("verified", "rm_score", "hero_weight", "sigma_ref", "partial", "prompt_mismatch")

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


def build_response(results: list[AssembledResult],
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
    }
    assert set(extra_logs) == set(LOG_KEYS)
    return GetRewardResponse(rewards=rewards, scores=list(verified), extra_logs=extra_logs)


class GetRewardScorer:
    """Scores /get_reward traffic: request by request, or through group assembly."""

    def __init__(self, pipeline: Pipeline, running_sigma, on_sigma, group_size: int,
                 group_timeout_s: float, max_waiting: int) -> None:
        self.pipeline = pipeline
        self.running_sigma = running_sigma
        self._on_sigma = on_sigma
        self.assembler = (GroupAssembler(group_size, group_timeout_s, max_waiting,
                                         self._score_one) if group_size > 0 else None)

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

    async def _score_groups(self, groups: list[Group]) -> tuple[list, Optional[float]]:
        result = await self.pipeline.score(RewardsRequest(groups=groups), self.running_sigma.value)
        self._on_sigma(self.running_sigma.update(g.sigma for g in result.groups))
        return result.groups, result.sigma_ref

    async def _score_one(self, prompt: str, label: Optional[str],
                         responses: list[str]) -> ScoredGroup:
        (group,), sigma_ref = await self._score_groups(
            [Group(prompt=reward_model_prompt(prompt), reference=label, responses=responses)])
        return ScoredGroup(group, sigma_ref)

    async def score(self, request: GetRewardRequest) -> GetRewardResponse:
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
        groups = [Group(id=str(g), prompt=reward_model_prompt(q.prompt), reference=q.label,
                        responses=q.responses) for g, q in enumerate(split.groups)]
        results: list[Optional[AssembledResult]] = [None] * len(request.query)
        if self.assembler is None:
            scored, sigma_ref = await self._score_groups(groups)
            for q, group in zip(split.groups, scored):
                for index, position in enumerate(q.positions):
                    results[position] = AssembledResult(group, index, sigma_ref, False)
        else:
            # Validate here so one caller's bad query cannot fail the others in its group.
            self.pipeline.check(RewardsRequest(groups=groups))
            futures = [(q, self.assembler.add(q.prompt, q.label, q.responses))
                       for q in split.groups]
            for q, group_futures in futures:
                for position, outcome in zip(q.positions, await asyncio.gather(*group_futures)):
                    results[position] = outcome
        assert all(r is not None for r in results)
        return build_response(results, split.fallbacks)  # type: ignore[arg-type]
