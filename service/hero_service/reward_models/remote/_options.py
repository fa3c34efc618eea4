"""The ``remote:URL`` spec read once: the URL's options (see the package docstring) checked and
taken out of the URL that is called, into one frozen :class:`RemoteOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from ...redaction import redact_url

Protocol = Literal["classify", "pooling", "predict"]
InputMode = Literal["text", "chat"]

PROTOCOLS: tuple[Protocol, ...] = ("classify", "pooling", "predict")
TEI_DEFAULT_MAX_BATCH = 32
OPTION_NAMES = ("protocol", "model", "input", "index", "label", "activation", "max_batch")


@dataclass(frozen=True)
class RemoteOptions:
    """Everything the URL says. ``endpoint`` is called (secrets included); ``shown_*`` are the
    redacted forms for ids, logs and messages."""

    protocol: Protocol
    endpoint: str
    models_url: str
    shown_spec: str  # the whole URL as given, options included
    shown_url: str  # the endpoint
    model: str | None
    input_mode: InputMode
    index: int
    label: str | None
    raw: bool  # activation=raw: the head's raw output
    max_batch: int  # 0: no limit

    @property
    def vllm(self) -> bool:
        return self.protocol != "predict"

    @classmethod
    def from_url(cls, url: str) -> RemoteOptions:
        """Parse and check the URL; a ``ValueError`` names the (redacted) URL and what is wrong."""
        parts = urlsplit(url)
        shown = redact_url(url)

        def invalid(what: str) -> ValueError:
            return ValueError(f"remote reward model URL {shown!r}: {what}")

        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise invalid("expected http(s)://host:port/path")
        query = parse_qsl(parts.query, keep_blank_values=True)
        options = {k: v for k, v in query if k in OPTION_NAMES}
        passthrough = [(k, v) for k, v in query if k not in OPTION_NAMES]
        path = parts.path.rstrip("/")
        last = path.rsplit("/", 1)[-1]
        protocol = options.get("protocol") or (last if last in PROTOCOLS else "")
        if protocol not in PROTOCOLS:
            raise invalid("end the path in /classify or /pooling (vLLM) or /predict (TEI), "
                          "or add ?protocol=classify|pooling|predict")
        vllm = protocol != "predict"
        endpoint = urlunsplit(parts._replace(query=urlencode(passthrough), fragment=""))

        input_mode = options.get("input", "text")
        if input_mode not in ("text", "chat"):
            raise invalid("input must be text or chat")
        if input_mode == "chat" and not vllm:
            raise invalid("input=chat needs vLLM (/classify or /pooling); "
                          "TEI /predict takes text only")
        activation = options.get("activation", "raw")
        if activation not in ("raw", "model"):
            raise invalid("activation must be raw or model")
        try:
            index = int(options.get("index", 0))
            max_batch = int(options.get("max_batch", 0 if vllm else TEI_DEFAULT_MAX_BATCH))
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if index < 0 or max_batch < 0:
            raise invalid("index and max_batch must be >= 0")
        return cls(
            protocol=protocol,
            endpoint=endpoint,
            models_url=_models_url(parts, path, last),
            shown_spec=shown,
            shown_url=redact_url(endpoint),
            model=options.get("model") or None,
            input_mode=cast(InputMode, input_mode),
            index=index,
            label=options.get("label") or None,
            raw=activation == "raw",
            max_batch=max_batch,
        )


def _models_url(parts: SplitResult, path: str, last: str) -> str:
    """vLLM's model listing: the API root (the endpoint's folder, less a trailing /v1), then
    /v1/models."""
    base = path[: -len(last)].rstrip("/")
    base = base.removesuffix("/v1")
    return urlunsplit(parts._replace(path=f"{base}/v1/models", query="", fragment=""))
