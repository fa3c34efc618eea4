"""One redaction rule for everything the service shows: start-up settings, ``/v1/info``, the
remote backend's model id and error messages, and every log line.

Secrets reach the service inside URLs (``--reward-model remote:https://user:pass@host/...?api_key=``,
``--group-store redis://:pass@host``), so a URL is shown with its userinfo replaced by ``***`` and
the values of secret-looking query/fragment parameters replaced by ``***``; everything else is kept
verbatim (the operator still sees which host, path and options are in use)."""

from __future__ import annotations

import logging
import re
import traceback
from urllib.parse import unquote

MASK = "***"

# Parameter names (lower case, '-' read as '_') whose values are credentials.
SECRET_PARAM_NAMES = frozenset({
    "api_key", "apikey", "key", "token", "access_token", "refresh_token", "id_token", "auth",
    "authorization", "secret", "client_secret", "password", "passwd", "pwd", "pass", "sig",
    "signature", "credential", "credentials", "session", "sessionid", "session_id", "jwt",
    "bearer", "private_key",
})
# ...and any name ending like these (x-amz-signature, subscription-key, hf_token, ...).
SECRET_PARAM_SUFFIXES = ("_key", "_token", "_secret", "_password", "_sig", "_signature",
                         "_credential")

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
# A secret-named parameter outside any URL (a query string quoted on its own).
_LOOSE_PARAM = re.compile(r"(?<=[?&;])([A-Za-z0-9_.\-]+)=([^&#\s'\"<>]*)")


def is_secret_param(name: str) -> bool:
    normal = unquote(name).strip().lower().replace("-", "_")
    return normal in SECRET_PARAM_NAMES or normal.endswith(SECRET_PARAM_SUFFIXES)


def _redact_params(params: str) -> str:
    """``a=1&api_key=s`` -> ``a=1&api_key=***``, other pieces untouched (not re-encoded)."""
    pieces = []
    for piece in params.split("&"):
        name, eq, value = piece.partition("=")
        pieces.append(f"{name}={MASK}" if eq and value and is_secret_param(name) else piece)
    return "&".join(pieces)


def redact_url(url: str) -> str:
    """The URL with its userinfo and secret parameter values masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # Split by hand rather than with urllib: it must never raise on a malformed URL, and the
    # parts that are not secret must come back byte for byte.
    cut = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at != -1:
            cut = min(cut, at)
    netloc, tail = rest[:cut], rest[cut:]
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    tail, hash_sign, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    if question:
        query = _redact_params(query)
    if hash_sign:
        fragment = _redact_params(fragment)
    return f"{scheme}://{netloc}{path}{question}{query}{hash_sign}{fragment}"


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted, and any stray ``?secret=value`` too."""
    if "://" not in text and "=" not in text:
        return text
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _LOOSE_PARAM.sub(
        lambda m: f"{m.group(1)}={MASK}" if m.group(2) and m.group(2) != MASK
        and is_secret_param(m.group(1)) else m.group(0), text)


class RedactingFilter(logging.Filter):
    """Redacts a record's final message and traceback before any handler formats it. Installed
    on the service's and uvicorn's handlers, so no log line can carry a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error report
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(
                "".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True
