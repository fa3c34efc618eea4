"""The service's math verifier against math-verify called directly, on a corpus of answer forms.

Agreement means: the service says "correct" exactly where ``verify(parse(reference),
parse(response))`` (the library's default way, in this process) says True — except for the cases
the corpus names, where the service reads a bare reference differently on purpose. For those the
verdict must be the library's own verdict on the reading the service chose, so the service never
invents a "correct" the library would not give."""

from __future__ import annotations

import asyncio

import pytest
from answer_forms import CASES, AnswerCase
from math_verify import parse, verify

from hero_service.verifiers import MathVerifier, Verdict


def library_says(reference: str, response: str) -> bool:
    return bool(verify(parse(reference), parse(response)))


@pytest.fixture(scope="module")
def service_verdicts() -> dict[str, Verdict]:
    async def go():
        verifier = MathVerifier(workers=2, timeout_s=2, max_tasks=500, memory_mb=2048)
        await verifier.start()
        try:
            verdicts = await asyncio.gather(*(verifier.verify(c.reference, [c.response])
                                              for c in CASES))
        finally:
            await verifier.close()
        return {c.name: v for c, (v,) in zip(CASES, verdicts)}

    return asyncio.run(go())


def test_corpus_covers_the_answer_forms():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 60
    for word in ("time", "percent", "decimal_comma", "thousands", "list", "interval", "matrix",
                 "degrees", "unit", "text", "frac", "set", "money", "complex"):
        assert any(word in n for n in names), word


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_service_agrees_with_math_verify(case: AnswerCase, service_verdicts):
    verdict = service_verdicts[case.name]
    library = library_says(case.reference, case.response)
    if case.reading is None:
        assert verdict.verified == library, (case, verdict, library)
    else:
        # A named deviation must be real (else the list goes stale) and must be the library's own
        # verdict on the reading the service chose.
        assert case.reason
        assert verdict.verified != library, f"{case.name} no longer deviates: drop its reading"
        assert verdict.verified == library_says(case.reading, case.response), (case, verdict)


def test_deviations_per_reason_are_few_and_named(service_verdicts):
    deviations = [c for c in CASES if c.reading is not None]
    agreeing = len(CASES) - len(deviations)
    print(f"math answer forms: {len(CASES)} cases, {agreeing} agree with math-verify's default "
          f"call, {len(deviations)} deviate by the bare-reference rule")
    for case in deviations:
        print(f"  {case.name}: {case.reason}")
    # Every delimited reference goes to the library unchanged, so no deviation may involve one.
    assert not [c.name for c in deviations if "$" in c.reference.replace("\\$", "")]


def test_both_readings_of_a_comma(service_verdicts):
    """A comma inside a bare reference: thousands separator, decimal comma, or list separator."""
    def status(name: str) -> str:
        return service_verdicts[name].status

    assert status("thousands_vs_plain") == status("thousands_both") == "correct"  # 1,000 = 1000
    assert status("thousands_wrong") == "incorrect"
    assert status("decimal_comma_vs_point") == "correct"  # 2,50 = 2.5
    assert status("decimal_comma_vs_list") == "incorrect"  # ... and not the set {2, 50}
    assert status("decimal_comma_long_fraction") == "correct"
    assert status("bare_list") == status("bare_list_reordered") == "correct"  # 1, -2 = {1, -2}
    assert status("bare_list_partial") == "incorrect"  # ... and not -2 alone
    assert status("bare_list_no_spaces") == "correct"


def test_a_failed_symbolic_comparison_falls_back_like_the_library(service_verdicts):
    """$10:00$ parses to zoo (10/0), so sympy's comparison raises; the library goes on to its
    string comparison, which says correct. Where the strings differ too, the failure is reported
    as an error rather than a silent incorrect."""
    assert service_verdicts["time_on_the_hour_itself"].status == "correct"
    assert service_verdicts["time_on_the_hour_in_text"].status == "correct"
    wrong = service_verdicts["time_on_the_hour_wrong"]
    assert wrong.status == "error" and "comparison" in (wrong.detail or "")
