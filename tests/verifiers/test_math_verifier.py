"""The math verifier: the real math-verify in the real worker pool."""

from __future__ import annotations

import asyncio

import pytest

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
    assert agree >= 399


def test_statuses_for_wrong_missing_and_unparsable_answers():
    out = verify_chunk("\\frac{1}{2}", ["so \\boxed{0.5}", "\\boxed{3}", "no answer here at all"], 2)
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
