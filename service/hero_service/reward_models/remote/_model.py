"""``RemoteRewardModel``: encodes rollouts (rendering, length estimate, truncation) and sends them
in batches through the protocol's codec and the retrying transport."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...redaction import redact_url
from ..base import (
    Encoded,
    Messages,
    RewardModel,
    RewardModelUnavailable,
    ScoringItem,
    as_messages,
    prompt_key,
    render_plain,
)
from ._codecs import Codec, VLLMCodec, codec_for
from ._options import Protocol, RemoteOptions
from ._transport import ATTEMPTS, BACKOFF_S, Backoff, RetryingTransport, decoded

DEFAULT_MAX_TOKENS = 4096
CHARS_PER_TOKEN = 4
CHAT_CONCURRENCY = 16
API_KEY_ENV = "HERO_REMOTE_RM_API_KEY"


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


render = render_plain  # the text mode's rendering (documented in the package docstring)


class RemoteRewardModel(RewardModel):
    needs_reference = False
    device_type = "remote"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        max_length: int = 0,
        api_key: str | None = None,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        self.options = RemoteOptions.from_url(url)
        # The options most read, by name (ids, messages, callers that inspect the backend).
        self.protocol: Protocol = self.options.protocol
        self.endpoint = self.options.endpoint
        self.models_url = self.options.models_url
        self.shown_url = self.options.shown_url
        self.model_id = f"remote:{self.options.shown_spec}"
        self.max_tokens = max_length or DEFAULT_MAX_TOKENS
        self.max_chars = self.max_tokens * CHARS_PER_TOKEN
        # TEI's --max-client-batch-size (32 by default): the batcher sends no larger batch.
        self.max_batch_size = self.options.max_batch
        self.timeout_s = float(timeout_s)
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._transport = RetryingTransport(
            timeout_s=self.timeout_s,
            backoff=Backoff(attempts=max(1, int(attempts)), backoff_s=backoff_s),
            api_key=api_key)
        # vLLM without ?model=: the codec is built once the server has named its model.
        known = self.options.model is not None or not self.options.vllm
        self._codec: Codec | None = codec_for(self.options, self.options.model) if known else None
        self._pool: ThreadPoolExecutor | None = None

    # -- encode (any thread) -------------------------------------------------------------------

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        return [self._encode_one(item) for item in items]

    def _encode_one(self, item: ScoringItem) -> Encoded:
        messages = as_messages(item.prompt)
        response = item.response
        prefix = render(messages, "")  # render(messages, r) == prefix + r
        text = prefix + response
        truncated = len(text) > self.max_chars
        if truncated:
            # Keep the end of the response; if the prompt alone fills the budget, keep the end
            # of the whole text (the server cuts the prompt from the left the same way).
            room = self.max_chars - len(prefix)
            response = response[-room:] if room > 0 else response[-self.max_chars:]
            text = (prefix + response)[-self.max_chars:]
        payload: str | Messages
        if self.options.input_mode == "chat":
            payload = [*messages, {"role": "assistant", "content": response}]
        else:
            payload = text
        return Encoded(
            key=(prompt_key(item.prompt), item.response),
            n_tokens=estimate_tokens(text),
            truncated=truncated,
            payload=payload,
        )

    # -- forward (the inference thread) --------------------------------------------------------

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        codec = self._codec or self._discover_codec()
        payloads = [e.payload for e in batch]
        if isinstance(codec, VLLMCodec) and self.options.input_mode == "chat":
            return self._forward_chat(codec, payloads)
        return codec.parse(self._transport.post(self.endpoint, codec.body(payloads)),
                           len(payloads))

    def _forward_chat(self, codec: VLLMCodec, conversations: list[Any]) -> list[float]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CHAT_CONCURRENCY, thread_name_prefix="hero-remote-rm")

        def one(conversation: Messages) -> float:
            return codec.parse(self._transport.post(self.endpoint, codec.chat_body(conversation)),
                               1)[0]

        # In waves: a failure stops the batch before the next wave is sent, so a server that is
        # down sees at most one wave (Executor.map's own cancelling races its pool threads).
        scores: list[float] = []
        for start in range(0, len(conversations), CHAT_CONCURRENCY):
            scores.extend(self._pool.map(one, conversations[start:start + CHAT_CONCURRENCY]))
        return scores

    def _discover_codec(self) -> Codec:
        """Ask ``GET <root>/v1/models`` once for the model name vLLM is to be sent."""
        response = self._transport.request("GET", self.models_url)
        if response.status_code == 404:
            # No listing: send no model name, the server uses its own.
            self._codec = codec_for(self.options, None)
            return self._codec
        listing = decoded(response, self.models_url)
        try:
            name = listing["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            name = None
        if not isinstance(name, str) or not name:
            raise RewardModelUnavailable(
                f"remote reward model at {redact_url(self.models_url)} lists no model; "
                "name one with ?model=NAME")
        self._codec = codec_for(self.options, name)
        return self._codec

    @property
    def remote_model(self) -> str | None:
        """The vLLM model name sent (None: not sent, or not yet discovered)."""
        return self._codec.model if isinstance(self._codec, VLLMCodec) else self.options.model

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._transport.close()
