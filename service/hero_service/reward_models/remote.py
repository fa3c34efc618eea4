"""The ``remote`` backend: a reward model already served over HTTP by vLLM or by
text-embeddings-inference (TEI). The service keeps its own batching, dedupe and timeouts; the
remote server runs the model.

Selecting it: ``--reward-model remote:URL``. The last segment of the URL's path picks the protocol:

    remote:http://rm:8000/classify      vLLM classification API   (vllm serve ... --runner pooling)
    remote:http://rm:8000/pooling       vLLM pooling API
    remote:http://rm:8080/predict       TEI /predict              (text-embeddings-router)

Options go in the query string. They are read here and removed from the URL that is called (other
query parameters pass through unchanged):

    protocol=classify|pooling|predict   when the path does not end in one of those names
    model=NAME        vLLM model name. Default: the first ``id`` listed by ``GET <root>/v1/models``
                      (``<root>``: the URL up to the endpoint, less a trailing ``/v1``),
                      asked once, on first use; when that endpoint does not exist (404) the field is
                      left out and vLLM uses its served model.
    input=text|chat   ``text`` (default): one rendered string per rollout, many rollouts per
                      request (see "Rendering"). ``chat`` (vLLM only): one request per rollout
                      carrying ``messages`` = the prompt's messages + ``{"role": "assistant",
                      "content": response}``, so vLLM applies the model's own chat template — what
                      chat-trained RMs (Skywork-Reward, ...) expect. Requests of a batch run
                      concurrently (up to 16 at a time).
    index=N           which output of the head is the reward (vLLM; default 0 = a 1-label RM).
    label=NAME        which TEI prediction is the reward; required when the model has more than one
                      label, because TEI sorts a text's predictions by score, not by label.
    activation=raw|model
                      ``raw`` (default): the head's raw output (vLLM ``use_activation: false``,
                      TEI ``raw_scores: true``), the same scale the ``hf`` backend reports.
                      ``model``: the server's activation (sigmoid for one label, softmax for
                      several). vLLM versions older than the ``use_activation`` field ignore it
                      and apply the activation; the scores stay monotonic in the logit.
    max_batch=N       most rollouts per HTTP request. Default 32 for TEI (its default
                      ``--max-client-batch-size``; raise both together), no limit for vLLM.

An API key for the remote server (vLLM ``--api-key``, TEI ``--api-key``) is read from the
``HERO_REMOTE_RM_API_KEY`` environment variable and sent as ``Authorization: Bearer ...``.

Wire shapes (checked against vLLM ``vllm/entrypoints/pooling/{classify,pooling}/protocol.py`` and
TEI ``router/src/http/{types,server}.rs``):

    vLLM  POST /classify  {"model": M, "input": [t1, t2, ...], "use_activation": false,
                           "truncate_prompt_tokens": -1, "truncation_side": "left"}
          -> {"data": [{"index": i, "label": ..., "probs": [p0, ...], "num_classes": k}, ...]}
          score = probs[index]
    vLLM  POST /pooling   same request -> {"data": [{"index": i, "object": "pooling", "data": D}]}
          D is [s0, ...] (sequence-level head; score = D[index]), a bare number, or one row per
          token [[s0, ...], ...] (token-level RMs; score = last row [index], the final token).
    vLLM  GET  /v1/models -> {"data": [{"id": M, ...}, ...]}
    TEI   POST /predict   {"inputs": [[t1], [t2], ...], "raw_scores": true, "truncate": true,
                           "truncation_direction": "Left"}
          -> [[{"score": s, "label": L}, ...], ...]   (one list per input, in input order)

TEI reads a flat ``["a", "b"]`` as one *pair* of texts, so every input is sent as a one-element
list. ``truncate_prompt_tokens: -1`` / ``truncate: true`` make the server cut inputs longer than the
model's limit from the left (keeping the response's end) instead of failing the whole batch.

Rendering (``input=text``): the prompt's message contents joined by newlines, a newline, then the
response — the same fallback the ``hf`` backend uses for a tokenizer without a chat template. No
chat template is applied on either side, so prefer ``input=chat`` for chat-trained RMs on vLLM.

Length: the service has no tokenizer for a remote model, so ``n_tokens`` (which drives the token
budget of a batch) is estimated as ``len(text) // 4 + 1``. A rendered text longer than
``4 * max_tokens`` characters (``max_tokens`` = ``--max-length``, default 4096) is cut from the
front of the *response*, keeping its end (the final answer), and flagged ``truncated``.

Failures: connection errors and HTTP 429/502/503/504 are retried (3 attempts, short backoff,
honouring a small ``Retry-After``); a read timeout is not (each retry would cost another whole
timeout). What ``forward`` then raises, always naming the URL and the cause, tells the batcher
whether splitting the batch could help:

    RewardModelUnavailable   the server as a whole: a timeout, unreachable after the retries, any
                             5xx, any 4xx but those below (401/403/404: configuration, 408/429:
                             capacity), a body that is not JSON, a response of the wrong shape
                             (not the protocol's object, wrong count, bad index, missing label)
                             — the same for any input. The batch fails at once, unsplit, and the
                             circuit breaker counts it (503 ``reward_model_unavailable`` +
                             ``Retry-After``).
    RewardModelError         may be about an input: HTTP 400/413/422 (the server refused these
                             inputs; TEI's 413 "batch too large" passes once split), a score
                             that is not a finite number. The batcher bisects to find it.

In ``input=chat`` mode calls go out in waves of 16; a failed call stops the batch before the next
wave.
A failed call is never turned into a score.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from ..redaction import redact_url
from .base import (
    Encoded,
    RewardModel,
    RewardModelError,
    RewardModelUnavailable,
    ScoringItem,
    as_messages,
    prompt_key,
)

PROTOCOLS = ("classify", "pooling", "predict")
DEFAULT_MAX_TOKENS = 4096
CHARS_PER_TOKEN = 4
TEI_DEFAULT_MAX_BATCH = 32
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# The server refused these inputs: another split of the batch may pass (see "Failures").
INPUT_STATUSES = frozenset({400, 413, 422})
ATTEMPTS = 3
BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
CHAT_CONCURRENCY = 16
API_KEY_ENV = "HERO_REMOTE_RM_API_KEY"
_OPTIONS = ("protocol", "model", "input", "index", "label", "activation", "max_batch")


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


def render(messages: Sequence[dict[str, str]], response: str) -> str:
    context = "\n".join(m["content"] for m in messages)
    return f"{context}\n{response}" if context else response


def _redact(url: str) -> str:
    """The URL as shown in ids, logs and messages: user:password and secret query values
    (``api_key=``, ``token=``, ...) masked by the service-wide rule."""
    return redact_url(url)


class RemoteRewardModel(RewardModel):
    needs_reference = False

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
        parts = urlsplit(url)
        shown = _redact(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"remote reward model URL {shown!r}: expected http(s)://host:port/path")
        query = parse_qsl(parts.query, keep_blank_values=True)
        options = {k: v for k, v in query if k in _OPTIONS}
        passthrough = [(k, v) for k, v in query if k not in _OPTIONS]
        path = parts.path.rstrip("/")
        last = path.rsplit("/", 1)[-1]
        self.protocol = options.get("protocol") or (last if last in PROTOCOLS else "")
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"remote reward model URL {shown!r}: end the path in /classify or /pooling "
                f"(vLLM) or /predict (TEI), or add ?protocol=classify|pooling|predict")
        self.vllm = self.protocol != "predict"
        self.endpoint = urlunsplit(parts._replace(query=urlencode(passthrough), fragment=""))
        self.shown_url = _redact(self.endpoint)
        base = path[: -len(last)].rstrip("/")  # the API root: the endpoint's folder, minus /v1
        if base.endswith("/v1"):
            base = base[:-3]
        self.models_url = urlunsplit(
            parts._replace(path=f"{base}/v1/models", query="", fragment=""))

        self.input_mode = options.get("input", "text")
        if self.input_mode not in ("text", "chat"):
            raise ValueError(f"remote reward model URL {shown!r}: input must be text or chat")
        if self.input_mode == "chat" and not self.vllm:
            raise ValueError(f"remote reward model URL {shown!r}: input=chat needs vLLM "
                             "(/classify or /pooling); TEI /predict takes text only")
        activation = options.get("activation", "raw")
        if activation not in ("raw", "model"):
            raise ValueError(f"remote reward model URL {shown!r}: activation must be raw or model")
        self.raw = activation == "raw"
        try:
            self.index = int(options.get("index", 0))
            default_batch = 0 if self.vllm else TEI_DEFAULT_MAX_BATCH
            self.max_batch = int(options.get("max_batch", default_batch))
        except ValueError as exc:
            raise ValueError(f"remote reward model URL {shown!r}: {exc}") from None
        if self.index < 0 or self.max_batch < 0:
            raise ValueError(f"remote reward model URL {shown!r}: index and max_batch must be >= 0")
        self.label = options.get("label") or None
        self.remote_model: str | None = options.get("model") or None
        self._model_resolved = self.remote_model is not None or not self.vllm

        self.model_id = f"remote:{shown}"
        self.max_tokens = max_length or DEFAULT_MAX_TOKENS
        self.max_chars = self.max_tokens * CHARS_PER_TOKEN
        self.timeout_s = float(timeout_s)
        self.attempts = max(1, int(attempts))
        self.backoff_s = backoff_s
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s), headers=headers)
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
        if self.input_mode == "chat":
            payload: Any = [*messages, {"role": "assistant", "content": response}]
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
        if not self._model_resolved:
            self._discover_model()
        payloads = [e.payload for e in batch]
        if self.input_mode == "chat":
            return self._forward_chat(payloads)
        size = self.max_batch or len(payloads)
        scores: list[float] = []
        for start in range(0, len(payloads), size):
            chunk = payloads[start:start + size]
            scores.extend(self._parse(self._post(self._body(chunk)), len(chunk)))
        return scores

    def _forward_chat(self, conversations: list[Any]) -> list[float]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CHAT_CONCURRENCY, thread_name_prefix="hero-remote-rm")

        def one(messages: Any) -> float:
            return self._parse(self._post(self._body(messages, chat=True)), 1)[0]

        # In waves: a failure stops the batch before the next wave is sent, so a server that is
        # down sees at most one wave (Executor.map's own cancelling races its pool threads).
        scores: list[float] = []
        for start in range(0, len(conversations), CHAT_CONCURRENCY):
            scores.extend(self._pool.map(one, conversations[start:start + CHAT_CONCURRENCY]))
        return scores

    def _body(self, inputs: Any, chat: bool = False) -> dict[str, Any]:
        if not self.vllm:
            return {"inputs": [[text] for text in inputs], "raw_scores": self.raw,
                    "truncate": True, "truncation_direction": "Left"}
        body: dict[str, Any] = {}
        if self.remote_model:
            body["model"] = self.remote_model
        body["messages" if chat else "input"] = inputs
        if self.raw:
            body["use_activation"] = False
        body["truncate_prompt_tokens"] = -1
        body["truncation_side"] = "left"
        return body

    def _discover_model(self) -> None:
        response = self._request("GET", self.models_url, None)
        if response.status_code == 404:
            self._model_resolved = True  # no listing: send no model name, the server uses its own
            return
        self._raise_for_status(response, self.models_url)
        listing = self._json(response, self.models_url)
        try:
            name = listing["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            name = None
        if not isinstance(name, str) or not name:
            raise RewardModelUnavailable(
                f"remote reward model at {_redact(self.models_url)} lists no model; "
                "name one with ?model=NAME")
        self.remote_model = name
        self._model_resolved = True

    # -- HTTP ------------------------------------------------------------------------------------

    def _post(self, body: dict[str, Any]) -> Any:
        response = self._request("POST", self.endpoint, body)
        self._raise_for_status(response, self.endpoint)
        return self._json(response, self.endpoint)

    def _request(self, method: str, url: str, body: dict[str, Any] | None) -> httpx.Response:
        shown = _redact(url)
        cause = ""
        retry_after: float | None = None
        for attempt in range(self.attempts):
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1)
                time.sleep(min(max(wait, retry_after or 0.0), MAX_BACKOFF_S))
                retry_after = None
            try:
                response = self._client.request(method, url, json=body)
            except httpx.ConnectTimeout:
                cause = f"is unreachable (connect timed out after {self.timeout_s:g}s)"
                continue
            except httpx.TimeoutException as exc:
                raise RewardModelUnavailable(
                    f"remote reward model at {shown} timed out after {self.timeout_s:g}s"
                ) from exc
            except httpx.TransportError as exc:
                cause = f"is unreachable ({type(exc).__name__}: {exc})"
                continue
            if response.status_code in RETRY_STATUSES:
                cause = f"returned HTTP {response.status_code}: {_detail(response)}"
                retry_after = _retry_after(response)
                continue
            return response
        raise RewardModelUnavailable(
            f"remote reward model at {shown} {cause} (after {self.attempts} attempts)",
            retry_after_s=retry_after)

    @staticmethod
    def _raise_for_status(response: httpx.Response, url: str) -> None:
        if response.status_code >= 400:
            error = (RewardModelError if response.status_code in INPUT_STATUSES
                     else RewardModelUnavailable)
            raise error(
                f"remote reward model at {_redact(url)} returned HTTP {response.status_code}: "
                f"{_detail(response)}")

    @staticmethod
    def _json(response: httpx.Response, url: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise RewardModelUnavailable(
                f"remote reward model at {_redact(url)} returned a body that is not JSON: "
                f"{response.text[:200]!r}") from None

    # -- response shapes -------------------------------------------------------------------------

    def _parse(self, payload: Any, n: int) -> list[float]:
        if self.protocol == "predict":
            return self._parse_predict(payload, n)
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
            if self.protocol == "classify":
                scores[index] = self._pick(entry.get("probs"), f"result {index} 'probs'")
            else:
                scores[index] = self._pooled(entry.get("data"), index)
        return scores  # type: ignore[return-value]  # every slot filled: n distinct indices

    def _pooled(self, value: Any, index: int) -> float:
        where = f"result {index} 'data'"
        if isinstance(value, list) and value and isinstance(value[-1], list):
            # One row per token (token-level reward models): the final token's row scores it.
            return self._pick(value[-1], f"{where} (last token)")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._number(value, where)
        return self._pick(value, where)

    def _pick(self, values: Any, where: str) -> float:
        if not isinstance(values, list):
            raise self._malformed(f"{where} is {_kind(values)}, not a list")
        if self.index >= len(values):
            raise self._malformed(f"{where} has {len(values)} values; index={self.index} asked")
        return self._number(values[self.index], where)

    def _parse_predict(self, payload: Any, n: int) -> list[float]:
        if n == 1 and isinstance(payload, list) and payload and isinstance(payload[0], dict):
            payload = [payload]  # a single-input answer (TEI's unbatched shape)
        if not isinstance(payload, list):
            raise self._malformed(f"expected a list of predictions, got {_kind(payload)}")
        if len(payload) != n:
            raise self._malformed(f"{len(payload)} results for {n} inputs")
        scores = []
        for position, predictions in enumerate(payload):
            where = f"result {position}"
            if not isinstance(predictions, list) or not predictions \
                    or not all(isinstance(p, dict) for p in predictions):
                raise self._malformed(f"{where} is not a list of {{score, label}} objects")
            if self.label is not None:
                chosen = [p for p in predictions if p.get("label") == self.label]
                if not chosen:
                    labels = [p.get("label") for p in predictions]
                    raise self._malformed(f"{where} has no label {self.label!r} (labels: {labels})")
            elif len(predictions) == 1:
                chosen = predictions
            else:
                labels = [p.get("label") for p in predictions]
                raise RewardModelUnavailable(
                    f"remote reward model at {self.shown_url} has {len(predictions)} labels "
                    f"{labels}; name the reward's label with ?label=NAME")
            scores.append(self._number(chosen[0].get("score"), f"{where} 'score'"))
        return scores

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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _detail(response: httpx.Response) -> str:
    """The server's error message: vLLM {"error": {"message"}} / {"message"}, TEI {"error"}."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
    text = str(message) if message else (response.text or response.reason_phrase)
    return text.strip()[:300]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
