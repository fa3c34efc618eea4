"""The audit log of flagged responses (``--audit-log PATH``, off by default).

One JSON line per response whose verifier verdict and RM score disagree
(``GroupResult.disagreement``, see ``hero_client.diagnostics``): the body's request id (``null``
where the body has none, as on ``/get_reward``), the HTTP request's ``X-Request-Id`` (always set:
the id of the access log's line for the request), the group id, the response's index in its group
as the caller sent it, its verifier status, RM score, the kind, and the last :data:`TAIL_CHARS`
characters of the response (where a final answer sits). Each response
is written by the request that sent it, so a group assembled across requests and replicas is
logged piece by piece, each replica in its own file.

- **Sampled**: ``--audit-sample-rate`` of the flagged responses are kept (1.0: all).
- **Bounded**: the file is rotated at ``--audit-max-bytes`` with :data:`BACKUPS` old files kept
  (``logging.handlers.RotatingFileHandler``), so the log never holds more than
  (1 + BACKUPS) x that.
- **Never blocking a request**: requests only put lines on a bounded queue; one writer thread
  writes them. A full queue (the disk is slower than the flags) drops the line and counts it in
  ``hero_audit_dropped_total``, as does a failed write.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import random
import threading
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from hero_client.schema import GroupResult
from hero_client.vocabulary import DisagreementKind, VerifierStatus

from .metrics import Metrics

log = logging.getLogger(__name__)

TAIL_CHARS = 200
BACKUPS = 3
QUEUE_LINES = 10_000
CLOSE_TIMEOUT_S = 5.0

# The X-Request-Id of the HTTP request being handled (set by the RequestMetrics middleware for
# the request's task): audit lines carry it without threading it through every scoring call.
HTTP_REQUEST_ID: ContextVar[Optional[str]] = ContextVar("hero_http_request_id", default=None)


@dataclass(frozen=True)
class AuditEntry:
    """One flagged response, as its line in the audit log."""

    request_id: Optional[str]
    group_id: str
    index: int
    status: VerifierStatus
    rm_score: Optional[float]
    kind: DisagreementKind
    response_tail: str
    http_request_id: Optional[str] = None

    def line(self) -> str:
        return json.dumps({"time": round(time.time(), 3), **asdict(self)}, ensure_ascii=False)


def flagged_entries(request_id: Optional[str], group: GroupResult,
                    responses: Sequence[str]) -> list[AuditEntry]:
    """The flagged responses of ``group`` (the caller's own entries, in ``responses`` order)."""
    if not group.disagreement:
        return []
    if len(responses) != len(group.disagreement):
        raise ValueError(f"{len(responses)} responses for {len(group.disagreement)} flags")
    entries = []
    for i, kind in enumerate(group.disagreement):
        if kind is None:
            continue
        entries.append(AuditEntry(
            request_id=request_id, group_id=group.id, index=i,
            status=group.verifier_status[i],
            rm_score=group.rm_scores[i] if group.rm_scores is not None else None,
            kind=kind, response_tail=responses[i][-TAIL_CHARS:],
            http_request_id=HTTP_REQUEST_ID.get()))
    return entries


class _RotatingLines(logging.handlers.RotatingFileHandler):
    """A failed write raises to the writer thread (which counts it) instead of printing a
    traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # called from emit's except block: re-raises the write's error


class AuditLog:
    """A sampled, rotated JSON-lines file written by one background thread."""

    def __init__(self, path: Path, *, sample_rate: float, max_bytes: int, metrics: Metrics,
                 backups: int = BACKUPS, queue_lines: int = QUEUE_LINES,
                 rng: Optional[random.Random] = None) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within [0, 1], got {sample_rate}")
        self.path = path
        self.sample_rate = sample_rate
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._queue: queue.Queue[Optional[str]] = queue.Queue(maxsize=queue_lines)  # None: stop
        # Opened here, so an unwritable path is a start-up error rather than lost lines.
        self._handler = _RotatingLines(path, maxBytes=max_bytes, backupCount=backups,
                                       encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._thread = threading.Thread(target=self._write_lines, name="audit-log", daemon=True)
        self._thread.start()

    def record(self, entries: Sequence[AuditEntry]) -> None:
        """Queue the sampled entries' lines; returns at once (a full queue drops them)."""
        for entry in entries:
            if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
                continue
            try:
                self._queue.put_nowait(entry.line())
            except queue.Full:
                self._metrics.audit_dropped.inc()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued (up to ``timeout_s``), then close the file."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("audit log %s: writer still busy after %.0f s; closing", self.path,
                        timeout_s)
        self._thread.join(timeout_s)
        self._handler.close()

    def _write_lines(self) -> None:
        failing = False  # log the first failed write of a run of them, not every one
        while True:
            item = self._queue.get()
            if item is None:
                return
            record = logging.LogRecord("hero_service.audit", logging.INFO, __file__, 0, item,
                                       None, None)
            try:
                self._handler.emit(record)
            except Exception:  # a disk full or gone must not stop the writer
                self._metrics.audit_dropped.inc()
                if not failing:
                    log.warning("audit log %s: write failed; dropping lines until a write "
                                "succeeds", self.path, exc_info=True)
                failing = True
                continue
            if failing:
                log.info("audit log %s: writing again", self.path)
            failing = False
            self._metrics.audit_lines.inc()
