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

Layout (httpx's client → transport layering): ``_options`` reads the URL once into a frozen
``RemoteOptions``; ``_codecs`` has one codec per protocol (``body`` / ``parse``, the shapes above);
``_transport`` is the one retrying HTTP call (what is retried, what raises what); ``_model`` is
``RemoteRewardModel`` itself (encoding, batching of requests, chat waves, model discovery).
"""

from __future__ import annotations

from ._codecs import (
    Codec,
    TEIPredictCodec,
    VLLMClassifyCodec,
    VLLMCodec,
    VLLMPoolingCodec,
    codec_for,
)
from ._model import (
    API_KEY_ENV,
    CHARS_PER_TOKEN,
    CHAT_CONCURRENCY,
    DEFAULT_MAX_TOKENS,
    RemoteRewardModel,
    estimate_tokens,
    render,
)
from ._options import PROTOCOLS, TEI_DEFAULT_MAX_BATCH, RemoteOptions
from ._transport import (
    ATTEMPTS,
    BACKOFF_S,
    INPUT_STATUSES,
    MAX_BACKOFF_S,
    Backoff,
    RetryingTransport,
)

__all__ = [
    "API_KEY_ENV",
    "ATTEMPTS",
    "BACKOFF_S",
    "CHARS_PER_TOKEN",
    "CHAT_CONCURRENCY",
    "DEFAULT_MAX_TOKENS",
    "INPUT_STATUSES",
    "MAX_BACKOFF_S",
    "PROTOCOLS",
    "TEI_DEFAULT_MAX_BATCH",
    "Backoff",
    "Codec",
    "RemoteOptions",
    "RemoteRewardModel",
    "RetryingTransport",
    "TEIPredictCodec",
    "VLLMClassifyCodec",
    "VLLMCodec",
    "VLLMPoolingCodec",
    "codec_for",
    "estimate_tokens",
    "render",
]
