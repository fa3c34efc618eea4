from __future__ import annotations

import asyncio

from hero_service.verifiers import ExactVerifier, NoVerifier, NumericVerifier
from hero_service.verifiers.text import last_boxed, normalize_answer, parse_number


def statuses(verifier, reference, responses):
    return [v.status for v in asyncio.run(verifier.verify(reference, responses))]


def test_last_boxed_matches_nested_braces():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("{" * 5000 + "\\boxed{" + "{" * 5000) is None


def test_exact_verifier():
    assert statuses(ExactVerifier(), "\\text{Paris}", [
        "The capital is \\boxed{paris}.", "\\boxed{Lyon}", "", "Final answer: Paris"
    ]) == ["correct", "incorrect", "no_answer", "incorrect"]
    assert normalize_answer(" $4$. ") == "4"


def test_numeric_verifier_uses_a_tolerance():
    assert statuses(NumericVerifier(), "3.14159", [
        "\\boxed{3.141590000001}", "\\boxed{3.14}", "answer: 1,000", "no digits"
    ]) == ["correct", "incorrect", "incorrect", "no_answer"]
    assert parse_number("total 1,000 apples") == 1000.0
    assert statuses(NumericVerifier(), "no number", ["\\boxed{1}"]) == ["no_answer"]


def test_no_verifier_marks_everything_skipped():
    verdicts = asyncio.run(NoVerifier().verify(None, ["a", "b"]))
    assert [v.status for v in verdicts] == ["skipped", "skipped"]
    assert not any(v.verified for v in verdicts)
