"""In-process verifiers on the extracted final answer: ``exact``, ``numeric`` and ``none``.

They are linear-time string work, so they run in a thread rather than the process pool."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence

from .base import Verdict, Verifier

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_TEXT_WRAPPER = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} that closes, braces matched; None if there is none.

    One pass over the braces with a stack of open ones, so it is linear: scanning forward from
    every opening instead is quadratic, and "\\boxed{" * 27000 took minutes."""
    box_openings = {m.end() - 1 for m in _BOXED.finditer(text)}
    if not box_openings:
        return None
    open_braces: list[int] = []
    best: tuple[int, int] | None = None  # (content start, content end) of the last-opened box
    for brace in _BRACE.finditer(text):
        position = brace.start()
        if text[position] == "{":
            open_braces.append(position)
        elif open_braces:  # a "}" with nothing open is stray text
            opened = open_braces.pop()
            if opened in box_openings and (best is None or opened + 1 > best[0]):
                best = (opened + 1, position)
    return text[best[0]:best[1]] if best is not None else None


def final_answer(text: str) -> str | None:
    """The boxed answer if any, else the last non-empty line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize_answer(answer: str) -> str:
    answer = _TEXT_WRAPPER.sub(r"\1", answer)
    answer = answer.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    answer = re.sub(r"\s+", "", answer).rstrip(".").lower()
    return answer


def parse_number(text: str) -> float | None:
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


class _InProcessVerifier(Verifier):
    async def verify(self, reference: str | None, responses: Sequence[str]) -> list[Verdict]:
        return await asyncio.to_thread(self._verify_all, reference, list(responses))

    def _verify_all(self, reference: str | None, responses: list[str]) -> list[Verdict]:
        if reference is None:
            return [Verdict("no_answer", "no reference given")] * len(responses)
        verdicts = []
        for response in responses:
            try:
                verdicts.append(self.judge(reference, response))
            except Exception as exc:  # one bad response is that response's error
                verdicts.append(Verdict("error", f"{type(exc).__name__}: {str(exc)[:200]}"))
        return verdicts

    def judge(self, reference: str, response: str) -> Verdict:
        raise NotImplementedError


class ExactVerifier(_InProcessVerifier):
    """Normalised string match of the final answer (boxed, else last line) with the reference."""

    name = "exact"

    def judge(self, reference: str, response: str) -> Verdict:
        answer = final_answer(response)
        if answer is None or not normalize_answer(answer):
            return Verdict("no_answer", "no final answer found")
        gold = normalize_answer(last_boxed(reference) or reference)
        return Verdict("correct" if normalize_answer(answer) == gold else "incorrect")


class NumericVerifier(_InProcessVerifier):
    """Last number in the final answer vs the reference's, within a relative/absolute tolerance."""

    name = "numeric"

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> None:
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    def judge(self, reference: str, response: str) -> Verdict:
        gold = parse_number(last_boxed(reference) or reference)
        if gold is None:
            return Verdict("no_answer", "no number in the reference")
        answer = final_answer(response)
        value = parse_number(answer) if answer is not None else None
        if value is None:
            return Verdict("no_answer", "no number in the final answer")
        ok = math.isclose(value, gold, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return Verdict("correct" if ok else "incorrect")


class NoVerifier(Verifier):
    """No rule-based check: every response is in the "not verified" stratum (status "skipped"),
    so HERO reduces to RM scores normalised into [-alpha, alpha] with the variance weight."""

    name = "none"
    needs_reference = False

    async def verify(self, reference: str | None, responses: Sequence[str]) -> list[Verdict]:
        return [Verdict("skipped")] * len(responses)
