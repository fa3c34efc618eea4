"""One codec per wire protocol (the shapes are in the package docstring): ``body`` builds the
request for some inputs, ``parse`` turns the answer into one score per input, in input order, or
raises. A codec is fixed once built (the vLLM model name included), so threads share it."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

from ..base import Messages, RewardModelError, RewardModelUnavailable
from ._options import RemoteOptions


class Codec(abc.ABC):
    def __init__(self, options: RemoteOptions) -> None:
        self.protocol = options.protocol
        self.shown_url = options.shown_url
        self.index = options.index
        self.label = options.label
        self.raw = options.raw

    @abc.abstractmethod
    def body(self, texts: Sequence[str]) -> dict[str, Any]:
        """The request body scoring ``texts``, one rendered rollout each."""

    @abc.abstractmethod
    def parse(self, payload: Any, n: int) -> list[float]:
        """The ``n`` scores in a decoded answer to a body of ``n`` inputs."""

    def _pick(self, values: Any, where: str) -> float:
        if not isinstance(values, list):
            raise self._malformed(f"{where} is {_kind(values)}, not a list")
        if self.index >= len(values):
            raise self._malformed(f"{where} has {len(values)} values; index={self.index} asked")
        return self._number(values[self.index], where)

    def _number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            # The one shape problem that can be about an input (e.g. NaN from an overflow).
            raise self._malformed(f"{where} is {value!r}, not a finite number", whole=False)
        return float(value)

    def _malformed(self, what: str, whole: bool = True) -> RewardModelError:
        """``whole``: the response as such is wrong, whatever the inputs (see "Failures")."""
        error = RewardModelUnavailable if whole else RewardModelError
        return error(
            f"remote reward model at {self.shown_url} returned a malformed {self.protocol} "
            f"response: {what}")


class VLLMCodec(Codec):
    """vLLM's pooling-runner APIs: the same request, and a ``data`` list of indexed results."""

    def __init__(self, options: RemoteOptions, model: str | None) -> None:
        super().__init__(options)
        self.model = model  # None: leave the field out, the server uses its served model

    def body(self, texts: Sequence[str]) -> dict[str, Any]:
        return self._body("input", list(texts))

    def chat_body(self, conversation: Messages) -> dict[str, Any]:
        """One rollout as a conversation: vLLM applies the model's own chat template."""
        return self._body("messages", conversation)

    def _body(self, field: str, inputs: Any) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.model:
            body["model"] = self.model
        body[field] = inputs
        if self.raw:
            body["use_activation"] = False
        body["truncate_prompt_tokens"] = -1
        body["truncation_side"] = "left"
        return body

    def parse(self, payload: Any, n: int) -> list[float]:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            raise self._malformed(f"expected an object with a 'data' list, got {_kind(payload)}")
        data = payload["data"]
        if len(data) != n:
            raise self._malformed(f"{len(data)} results for {n} inputs")
        scores: list[float | None] = [None] * n
        for position, entry in enumerate(data):
            if not isinstance(entry, dict):
                raise self._malformed(f"result {position} is {_kind(entry)}, not an object")
            index = entry.get("index", position)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n \
                    or scores[index] is not None:
                raise self._malformed(f"result {position} has a bad or repeated index {index!r}")
            scores[index] = self._score(entry, index)
        return [score for score in scores if score is not None]  # all n: n distinct indices

    @abc.abstractmethod
    def _score(self, entry: dict[str, Any], index: int) -> float:
        """The score in result ``index`` (its ``index`` field, not its position)."""


class VLLMClassifyCodec(VLLMCodec):
    def _score(self, entry: dict[str, Any], index: int) -> float:
        return self._pick(entry.get("probs"), f"result {index} 'probs'")


class VLLMPoolingCodec(VLLMCodec):
    def _score(self, entry: dict[str, Any], index: int) -> float:
        value = entry.get("data")
        where = f"result {index} 'data'"
        if isinstance(value, list) and value and isinstance(value[-1], list):
            # One row per token (token-level reward models): the final token's row scores it.
            return self._pick(value[-1], f"{where} (last token)")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._number(value, where)
        return self._pick(value, where)


class TEIPredictCodec(Codec):
    def body(self, texts: Sequence[str]) -> dict[str, Any]:
        # TEI reads a flat ["a", "b"] as one *pair* of texts: each input is its own list.
        return {"inputs": [[text] for text in texts], "raw_scores": self.raw,
                "truncate": True, "truncation_direction": "Left"}

    def parse(self, payload: Any, n: int) -> list[float]:
        if n == 1 and isinstance(payload, list) and payload and isinstance(payload[0], dict):
            payload = [payload]  # a single-input answer (TEI's unbatched shape)
        if not isinstance(payload, list):
            raise self._malformed(f"expected a list of predictions, got {_kind(payload)}")
        if len(payload) != n:
            raise self._malformed(f"{len(payload)} results for {n} inputs")
        return [self._score(predictions, f"result {position}")
                for position, predictions in enumerate(payload)]

    def _score(self, predictions: Any, where: str) -> float:
        if not isinstance(predictions, list) or not predictions \
                or not all(isinstance(p, dict) for p in predictions):
            raise self._malformed(f"{where} is not a list of {{score, label}} objects")
        labels = [p.get("label") for p in predictions]
        if self.label is not None:
            chosen = [p for p in predictions if p.get("label") == self.label]
            if not chosen:
                raise self._malformed(f"{where} has no label {self.label!r} (labels: {labels})")
        elif len(predictions) == 1:
            chosen = predictions
        else:
            # TEI sorts a text's predictions by score, so without a label none can be chosen.
            raise RewardModelUnavailable(
                f"remote reward model at {self.shown_url} has {len(predictions)} labels "
                f"{labels}; name the reward's label with ?label=NAME")
        return self._number(chosen[0].get("score"), f"{where} 'score'")


def codec_for(options: RemoteOptions, model: str | None = None) -> Codec:
    """The codec of ``options.protocol``; ``model``: the vLLM model name to send, if any."""
    if options.protocol == "classify":
        return VLLMClassifyCodec(options, model)
    if options.protocol == "pooling":
        return VLLMPoolingCodec(options, model)
    return TEIPredictCodec(options)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
