"""The audit log of flagged responses (hero_service.audit) on real files: its lines, sampling,
rotation, and that a request never waits for it (a full queue drops and counts)."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from hero_client.schema import GroupResult
from hero_service.audit import (
    BACKUPS,
    HTTP_REQUEST_ID,
    TAIL_CHARS,
    AuditEntry,
    AuditLog,
    flagged_entries,
)
from hero_service.metrics import Metrics


def group_result(**fields: object) -> GroupResult:
    base: dict[str, object] = {
        "id": "q-1", "sigma": 1.0, "weight": 1.0, "rewards": [1.0, 0.1, 0.0],
        "verified": [True, False, False],
        "verifier_status": ["correct", "incorrect", "no_answer"],
        "rm_scores": [2.0, 2.5, -1.0], "normalized": [1.0, 0.1, 0.0],
        "truncated": [False] * 3,
        "disagreement": [None, "likely_false_negative", None]}
    return GroupResult.model_validate({**base, **fields})


def entry(i: int, tail: str = "x") -> AuditEntry:
    return AuditEntry("req", "g", i, "incorrect", 1.0, "likely_false_negative", tail)


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flagged_entries_are_the_flagged_responses_with_their_tails():
    long_response = "reasoning " * 50 + "so the answer is \\boxed{7}"
    entries = flagged_entries("req-9", group_result(), ["\\boxed{4}", long_response, "?"])
    assert entries == [AuditEntry("req-9", "q-1", 1, "incorrect", 2.5, "likely_false_negative",
                                  long_response[-TAIL_CHARS:])]
    assert entries[0].response_tail.endswith("\\boxed{7}") and len(entries[0].response_tail) == 200
    assert flagged_entries("r", group_result(disagreement=None), ["a", "b", "c"]) == []
    with pytest.raises(ValueError, match="2 responses for 3 flags"):
        flagged_entries("r", group_result(), ["a", "b"])


def test_entries_name_the_http_request_being_handled():
    assert flagged_entries(None, group_result(), ["a", "b", "c"])[0].http_request_id is None
    token = HTTP_REQUEST_ID.set("4f2a1c-00002a")
    try:
        entries = flagged_entries(None, group_result(), ["a", "b", "c"])
    finally:
        HTTP_REQUEST_ID.reset(token)
    assert [(e.request_id, e.http_request_id) for e in entries] == [(None, "4f2a1c-00002a")]
    assert json.loads(entries[0].line())["http_request_id"] == "4f2a1c-00002a"


def test_lines_are_written_as_json_and_the_file_is_flushed_on_close(tmp_path):
    metrics = Metrics()
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, sample_rate=1.0, max_bytes=1 << 20, metrics=metrics)
    before = time.time()
    audit.record([entry(0, "tail \u00e9 \\boxed{5}"), entry(1)])
    audit.close()
    lines = read_lines(path)
    assert [line["index"] for line in lines] == [0, 1]
    first = lines[0]
    assert {k: v for k, v in first.items() if k != "time"} == {
        "request_id": "req", "group_id": "g", "index": 0, "status": "incorrect",
        "rm_score": 1.0, "kind": "likely_false_negative", "response_tail": "tail é \\boxed{5}",
        "http_request_id": None}
    assert before - 1 <= first["time"] <= time.time() + 1
    assert sample(metrics, "hero_audit_lines_total") == 2
    assert sample(metrics, "hero_audit_dropped_total") == 0


@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
def test_a_share_of_the_flagged_responses_is_kept(tmp_path, rate):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, sample_rate=rate, max_bytes=1 << 22, metrics=Metrics(),
                     rng=random.Random(7))
    audit.record([entry(i) for i in range(2000)])
    audit.close()
    kept = len(read_lines(path))
    # 2000 draws at 0.25: the binomial's std is ~19, so +-100 is > 5 sigma.
    assert abs(kept - 2000 * rate) <= 100
    if rate in (0.0, 1.0):
        assert kept == 2000 * rate


def test_the_log_is_rotated_and_bounded(tmp_path):
    path = tmp_path / "audit.jsonl"
    max_bytes = 4096
    metrics = Metrics()
    audit = AuditLog(path, sample_rate=1.0, max_bytes=max_bytes, metrics=metrics)
    audit.record([entry(i, "y" * 150) for i in range(500)])  # ~125 kB of lines
    audit.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.jsonl"] + [f"audit.jsonl.{i}"
                                                          for i in range(1, BACKUPS + 1)]
    assert all(f.stat().st_size <= max_bytes for f in files)
    # The newest lines survive, in order, in the current file.
    assert read_lines(path)[-1]["index"] == 499
    assert sample(metrics, "hero_audit_lines_total") == 500


class _SlowStream:
    """A file whose writes wait until released: a disk slower than the flags."""

    def __init__(self, inner, release: threading.Event) -> None:
        self.inner, self.release = inner, release

    def write(self, text: str) -> int:
        self.release.wait(30)
        return self.inner.write(text)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    metrics = Metrics()
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, sample_rate=1.0, max_bytes=1 << 20, metrics=metrics, queue_lines=10)
    release = threading.Event()
    audit._handler.stream = _SlowStream(audit._handler.stream, release)
    started = time.perf_counter()
    audit.record([entry(i) for i in range(100)])
    elapsed = time.perf_counter() - started
    # The writer holds one line, the queue ten: the other 89 are dropped at once.
    dropped = sample(metrics, "hero_audit_dropped_total")
    assert 88 <= dropped <= 90
    assert elapsed < 0.5
    release.set()
    audit.close()
    assert len(read_lines(path)) == 100 - dropped
    assert sample(metrics, "hero_audit_lines_total") == 100 - dropped


def test_a_failed_write_is_counted_and_the_writer_goes_on(tmp_path):
    metrics = Metrics()
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, sample_rate=1.0, max_bytes=1 << 20, metrics=metrics)
    real = audit._handler.stream

    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(real, name)

    audit._handler.stream = FullDisk()
    audit.record([entry(0)])
    deadline = time.monotonic() + 10
    while sample(metrics, "hero_audit_dropped_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    audit._handler.stream = real
    audit.record([entry(1)])
    audit.close()
    assert sample(metrics, "hero_audit_dropped_total") == 1
    assert [line["index"] for line in read_lines(path)] == [1]


def test_an_unwritable_path_fails_at_once(tmp_path):
    with pytest.raises(OSError):
        AuditLog(tmp_path / "missing-dir" / "audit.jsonl", sample_rate=1.0, max_bytes=4096,
                 metrics=Metrics())


def test_a_sample_rate_outside_zero_to_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sample_rate must be within"):
        AuditLog(tmp_path / "a.jsonl", sample_rate=1.5, max_bytes=4096, metrics=Metrics())
