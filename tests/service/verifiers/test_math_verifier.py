"""The math verifier: the real math-verify in the real worker pool."""

from __future__ import annotations

import asyncio
import time

from stuck_worker import STUCK, verify_pairs_one_stuck

from hero_service.verifiers import MathVerifier
from hero_service.verifiers._math_worker import verify_chunk


def run(coro):
    return asyncio.run(coro)


async def _with_verifier(fn, **kwargs):
    verifier = MathVerifier(**{"workers": 2, "timeout_s": 2, "max_tasks": 500, "memory_mb": 2048,
                               **kwargs})
    await verifier.start()
    try:
        return await fn(verifier)
    finally:
        await verifier.close()


def test_agreement_with_grader_on_dev_data(dev_rows):
    async def score_all(verifier):
        return await asyncio.gather(*(verifier.verify(r["reference"], r["responses"])
                                      for r in dev_rows))

    results = run(_with_verifier(score_all))
    agree = sum((v.status == "correct") == g
                for row, verdicts in zip(dev_rows, results)
                for v, g in zip(verdicts, row["grader_correct"]))
    total = sum(len(r["responses"]) for r in dev_rows)
    print(f"math-verify agreement with grader_correct: {agree}/{total}")
    assert total == 400
    assert agree == total


def test_statuses_for_wrong_missing_and_unparsable_answers():
    responses = ["so \\boxed{0.5}", "\\boxed{3}", "no answer here at all"]
    out = verify_chunk("\\frac{1}{2}", responses, 2)
    assert [s for s, _ in out] == ["correct", "incorrect", "no_answer"]
    out = verify_chunk("", ["\\boxed{1}"], 2)
    assert out[0][0] == "no_answer" and "reference" in out[0][1]


def test_hostile_answer_times_out_and_neighbours_keep_their_verdicts():
    bomb = "\\boxed{10^{10^{10^{10}}}}"

    async def go(verifier):
        return await verifier.verify("4", ["\\boxed{4}", bomb, "\\boxed{5}"])

    verdicts = run(_with_verifier(go, timeout_s=1))
    assert [v.status for v in verdicts] == ["correct", "timeout", "incorrect"]


def test_missing_reference_is_reported_not_guessed():
    verdicts = run(_with_verifier(lambda v: v.verify(None, ["\\boxed{1}"])))
    assert verdicts[0].status == "no_answer" and not verdicts[0].verified


def _slow_but_healthy(i: int, terms: int = 500) -> str:
    """A sum of 500 ones with a 0 put in at place i: ~0.3 s of real math-verify work on this
    machine, far under the 2 s alarm, and distinct strings so no cache answers them early."""
    summands = ["1"] * terms
    summands.insert(i % terms, "0")
    return "\\boxed{" + "+".join(summands) + "}"


def test_a_chunk_of_slow_but_healthy_responses_is_not_killed():
    """One worker, 64 responses: two chunks of 32, each taking several times the old whole-chunk
    bound (2t + 1 = 5 s), which killed them and re-verified every response alone."""
    timeout_s = 2
    failures: list[str] = []
    responses = [_slow_but_healthy(i) for i in range(64)]

    async def go(verifier):
        return await verifier.verify("500", responses)

    started = time.monotonic()
    verdicts = run(_with_verifier(go, workers=1, timeout_s=timeout_s,
                                  on_worker_failure=failures.append))
    elapsed = time.monotonic() - started
    print(f"64 slow responses in 2 chunks: {elapsed:.1f} s, worker failures {len(failures)}")
    assert failures == []
    assert [v.status for v in verdicts] == ["correct"] * len(responses)
    # The premise: a chunk really ran longer than the old chunk bound.
    assert elapsed > 2 * (2 * timeout_s + 1), elapsed


class _VerifierWithAStuckCall(MathVerifier):
    worker_fn = staticmethod(verify_pairs_one_stuck)


def test_a_stuck_response_ends_as_timeout_and_only_it_is_charged():
    timeout_s = 1
    failures: list[str] = []
    responses = ["\\boxed{4}", "\\boxed{5}", STUCK, "\\boxed{2+2}", "no answer", "\\boxed{3}"]

    async def go():
        # One worker and one chunk (size ceil(6 / 2) = 3, then the other 3, in one call each).
        verifier = _VerifierWithAStuckCall(workers=1, timeout_s=timeout_s, max_tasks=500,
                                           memory_mb=2048, on_worker_failure=failures.append)
        await verifier.start()
        try:
            started = time.monotonic()
            verdicts = await verifier.verify("4", responses)
            return verdicts, time.monotonic() - started, verifier.step_timeout_s
        finally:
            await verifier.close()

    verdicts, elapsed, step_timeout_s = run(go())
    print(f"stuck response answered in {elapsed:.1f} s; failures {failures}")
    assert [v.status for v in verdicts] == [
        "correct", "incorrect", "timeout", "correct", "no_answer", "incorrect"]
    assert "killed" in verdicts[2].detail
    # Killed once in its chunk, once more when retried alone; nothing else was charged.
    assert failures == ["timeout", "timeout"]
    # Two overruns of one step, plus worker restarts and the neighbours' re-run.
    assert elapsed < 2 * step_timeout_s + 4, elapsed


class _ChunkRecordingVerifier(MathVerifier):
    """Records the size of every chunk sent to the pool (the real pool, the real verdicts)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.chunks: list[int] = []
        self.sent: list[tuple[int | None, list[str]]] = []  # (lane, references), in order

    async def _verify_chunk(self, pairs, lane=None):
        self.chunks.append(len(pairs))
        self.sent.append((lane, [reference for reference, _ in pairs]))
        return await super()._verify_chunk(pairs, lane)


def test_requests_arriving_together_share_chunks():
    """16 one-response requests at once, one worker (two chunks in flight): two chunks of 8,
    not 16 tasks, and each request gets its own verdict."""
    async def go():
        verifier = _ChunkRecordingVerifier(workers=1, timeout_s=2, max_tasks=500, memory_mb=2048)
        await verifier.start()
        try:
            verdicts = await asyncio.gather(*(verifier.verify(str(i), [f"\\boxed{{{i % 3}}}"])
                                              for i in range(16)))
            return verdicts, verifier.chunks
        finally:
            await verifier.close()

    verdicts, chunks = run(go())
    assert chunks == [8, 8]
    assert [v[0].status for v in verdicts] == [
        "correct" if i == i % 3 else "incorrect" for i in range(16)]


def test_the_end_of_a_burst_goes_out_in_thinner_slices():
    """200 responses, one worker (two slots): full chunks while the queue is long, then slices of
    what is left over both slots, so the last chunk is small (no long last chunk to wait for)."""
    async def go():
        verifier = _ChunkRecordingVerifier(workers=1, timeout_s=2, max_tasks=500, memory_mb=2048)
        await verifier.start()
        try:
            verdicts = await verifier.verify("7", [f"\\boxed{{{i % 9}}}" for i in range(200)])
            return verdicts, verifier.chunks
        finally:
            await verifier.close()

    verdicts, chunks = run(go())
    assert [v.status for v in verdicts] == [
        "correct" if i % 9 == 7 else "incorrect" for i in range(200)]
    assert sum(chunks) == 200
    assert chunks[:5] == [32] * 5
    assert chunks == sorted(chunks, reverse=True) and chunks[-1] == 1


def test_one_response_per_request_keeps_each_reference_on_one_lane():
    """Two groups' responses arriving one per request, interleaved, over separate turns of the
    loop (OpenRLHF's and verl's per-sample calls), two workers: every chunk of group A is sent
    on one lane and every chunk of group B on the other, so each worker parses one reference.
    With lanes off the same traffic goes to whichever worker is free (lane None)."""
    async def go(reference_lanes):
        verifier = _ChunkRecordingVerifier(workers=2, timeout_s=2, max_tasks=500, memory_mb=2048,
                                           reference_lanes=reference_lanes)
        await verifier.start()
        try:
            calls = []
            for i in range(8):
                for reference in ("3", "5"):
                    calls.append(asyncio.ensure_future(
                        verifier.verify(reference, [f"\\boxed{{{(i % 2) * 2 + 3}}}"])))
                await asyncio.sleep(0)
            verdicts = await asyncio.gather(*calls)
            return verdicts, verifier.sent
        finally:
            await verifier.close()

    verdicts, sent = run(go(True))
    lanes = {reference: {lane for lane, refs in sent if reference in refs} for reference in "35"}
    assert all(len(set(refs)) == 1 for _, refs in sent)  # no chunk mixes the two groups
    assert len(lanes["3"]) == 1 and len(lanes["5"]) == 1 and lanes["3"] != lanes["5"]
    expected = []
    for i in range(8):
        answer = (i % 2) * 2 + 3
        expected += ["correct" if answer == 3 else "incorrect",
                     "correct" if answer == 5 else "incorrect"]
    assert [v[0].status for v in verdicts] == expected

    verdicts, sent = run(go(False))
    assert {lane for lane, _ in sent} == {None}
    assert [v[0].status for v in verdicts] == expected


def test_a_burst_of_one_reference_still_spreads_over_every_worker():
    """One request of 64 responses to one reference, two workers: the idle lane takes part of
    the other's queue, so both lanes run chunks of 16 (as one queue would), verdicts in order."""
    async def go():
        verifier = _ChunkRecordingVerifier(workers=2, timeout_s=2, max_tasks=500, memory_mb=2048)
        await verifier.start()
        try:
            verdicts = await verifier.verify("4", [f"\\boxed{{{i % 5}}}" for i in range(64)])
            return verdicts, verifier.sent
        finally:
            await verifier.close()

    verdicts, sent = run(go())
    assert [v.status for v in verdicts] == [
        "correct" if i % 5 == 4 else "incorrect" for i in range(64)]
    assert sorted(len(refs) for _, refs in sent) == [16, 16, 16, 16]
    assert {lane for lane, _ in sent} == {0, 1}
