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


def test_last_boxed_is_linear_on_unclosed_boxes():
    """27,000 unclosed \\boxed{ took minutes with one forward scan per opening (quadratic)."""
    import time

    opened = "\\boxed{" * 27_000
    started = time.monotonic()
    assert last_boxed(opened) is None
    assert last_boxed(opened + "7}") == "7"  # the innermost box is the last one that closes
    assert last_boxed("\\boxed{1}" + opened) == "1"
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, elapsed


def test_last_boxed_picks_the_last_opening_that_closes():
    assert last_boxed("\\boxed{\\boxed{1}}") == "1"
    assert last_boxed("\\boxed{a} \\boxed{b") == "a"
    assert last_boxed("} \\boxed{x} }") == "x"
    assert last_boxed("\\fbox {2} and \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed{a}\\boxed{b}") == "b"


def test_text_verifiers_answer_the_quadratic_case_fast():
    import time

    # Unclosed boxes: no box, so the last line is the answer (not a match; no number in it).
    responses = ["\\boxed{" * 27_000, "\\boxed{" * 27_000 + "7}", "7"]
    expected = {"exact": ["incorrect", "correct", "correct"],
                "numeric": ["no_answer", "correct", "correct"]}
    for verifier in (ExactVerifier(), NumericVerifier()):
        started = time.monotonic()
        assert statuses(verifier, "7", responses) == expected[verifier.name]
        assert time.monotonic() - started < 2.0, verifier.name


def _last_boxed_by_scanning_from_each_opening(text: str) -> str | None:
    """The obvious (quadratic) definition, to check the linear matcher against on small inputs."""
    import re

    for start in reversed([m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def test_last_boxed_matches_the_scanning_definition():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    pieces = st.sampled_from(["\\boxed{", "\\fbox {", "{", "}", "1", "x", " ", "\\{", "\\}"])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(pieces, max_size=30).map("".join))
    def check(text: str) -> None:
        assert last_boxed(text) == _last_boxed_by_scanning_from_each_opening(text)

    check()
