"""Answer forms for the math verifier: (reference, response) pairs in the shapes MATH-style data and
model outputs take, listed in ``answer_forms.jsonl`` (one case a line, by section). Each case is
judged by the service and by math-verify called directly; where the service reads a reference
differently on purpose, the case names the reading and the reason (a key of ``REASONS``).

References come in two shapes:
- delimited (``$...$``, ``\\boxed{...}``): what math-verify's own docs pass as gold. The service
  hands these to the library unchanged, so the verdicts must agree exactly.
- bare (``7\\pi``, ``1, -2``, ``2,50``): how MATH and most RL data sets store answers. math-verify's
  plain parse of a bare string keeps only the last number it finds ("1, -2" -> -2, "7\\pi" -> 7),
  so the service reads bare references by the rule in verifiers/_math_worker.py, and every case
  where that changes the verdict carries ``reading`` (the form the library is given instead) and
  ``reason``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AnswerCase:
    name: str
    reference: str
    response: str
    # Set only where the service's verdict differs from verify(parse(reference), parse(response)):
    # the reference as the service's rule reads it, and why.
    reading: str | None = None
    reason: str | None = None


BARE_LATEX = ("bare reference read as LaTeX ($...$); the library's plain parse of a bare string "
              "keeps only its last number")
BARE_LIST = ("bare comma list read as a set ($...$); the library's plain parse keeps one number of "
             "the list (and would accept that number alone)")
BARE_TEXT = "bare \\text{} answer read as LaTeX; the library's plain parse finds nothing in it"
DECIMAL_COMMA = ("bare 'digits,digits' (one comma, not a thousands group) read as a decimal comma; "
                 "the library's plain parse of such a token drops digits past the third")
ESCAPED_DOLLAR = ("'\\$' is a currency sign, not a math delimiter: read as LaTeX ($...$); the "
                  "library finds nothing in the bare string")

REASONS = {"bare_latex": BARE_LATEX, "bare_list": BARE_LIST, "bare_text": BARE_TEXT,
           "decimal_comma": DECIMAL_COMMA, "escaped_dollar": ESCAPED_DOLLAR}


def load_cases(path: Path = Path(__file__).with_suffix(".jsonl")) -> list[AnswerCase]:
    cases = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        reason = row.get("reason")
        cases.append(AnswerCase(row["name"], row["reference"], row["response"],
                                row.get("reading"), REASONS[reason] if reason else None))
    return cases


CASES = load_cases()
