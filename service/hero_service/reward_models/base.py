"""The reward-model plug-in interface.

A backend splits its work in two so the batcher can do its job: ``encode`` (tokenization and
truncation; any thread, per request) turns items into token sequences whose lengths drive the
token budget and the length sort; ``forward`` (only ever on the one inference thread) scores a
batch of encoded items."""

from __future__ import annotations

import abc
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

Messages = list[dict[str, str]]
PromptLike = Union[str, Messages]


@dataclass(frozen=True)
class ScoringItem:
    prompt: PromptLike
    response: str
    reference: str | None = None


@dataclass(frozen=True)
class SharedPrefix:
    """The first ``n_tokens`` of an item's ``n_tokens`` that every item with the same ``key`` has
    too (a group's rendered prompt): a backend that :attr:`RewardModel.shares_prefixes` computes
    them once per batch. ``key`` must identify the tokens themselves, so equal keys are exact."""

    key: Hashable
    n_tokens: int


@dataclass
class Encoded:
    """A tokenized item. ``key`` identifies identical inputs so they are scored once;
    ``shared_prefix`` (None: nothing shared) is the part of it other items may share."""

    key: Hashable
    n_tokens: int
    truncated: bool
    payload: Any = field(repr=False)
    shared_prefix: SharedPrefix | None = None


class RewardModelError(RuntimeError):
    """The backend failed to score a batch. It may be input-specific (an input that breaks the
    model, out of memory), so the batcher splits the batch to find the items that fail."""


class RewardModelUnavailable(RewardModelError):
    """The backend failed as a whole, not because of an input: a timeout, an unreachable or
    failing (5xx) remote, an answer that is not a scores response. Splitting the batch would only
    repeat the failure, so the batcher fails the whole batch at once and counts it towards its
    circuit breaker. ``retry_after_s``: how long the caller should wait, when known."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RewardModel(abc.ABC):
    """A backend. Besides scoring, it declares what the batcher needs to batch for it (as TEI's
    backends declare ``requires_padding`` and ``max_batch_requests``)."""

    model_id: str
    needs_reference: bool = False
    max_tokens: int
    # Where it runs ("cpu", "cuda", "mps", "remote"): picks the default token budget.
    device_type: str = "cpu"
    # A batch costs its longest item × its size (padded to a rectangle); else the sum of tokens.
    padded: bool = True
    # The most items one forward may take (0: no limit); the batcher never sends more.
    max_batch_size: int = 0
    # forward computes each distinct ``Encoded.shared_prefix`` of a batch once (prefix sharing):
    # the batcher then keeps the items of one prefix in one batch and counts the prefix once.
    shares_prefixes: bool = False

    @abc.abstractmethod
    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        ...

    @abc.abstractmethod
    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        ...

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to free
        """Release the model (called once, at shutdown)."""


def prompt_key(prompt: PromptLike) -> Hashable:
    if isinstance(prompt, str):
        return prompt
    return tuple((m["role"], m["content"]) for m in prompt)


def render_plain(messages: Sequence[dict[str, str]], response: str) -> str:
    """The text an RM without a chat template scores: the prompt's message contents joined by
    newlines, a newline, then the response (hf's fallback; the remote backend's ``input=text``)."""
    context = "\n".join(m["content"] for m in messages)
    return f"{context}\n{response}" if context else response


def as_messages(prompt: PromptLike) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt else []
    return [dict(m) for m in prompt]


def tail(ids: Sequence[int], limit: int) -> tuple[list[int], bool]:
    """Keep the *end* of a token sequence (where the final answer is); say if anything was cut."""
    if limit <= 0:
        return [], bool(ids)
    if len(ids) <= limit:
        return list(ids), False
    return list(ids[-limit:]), True
