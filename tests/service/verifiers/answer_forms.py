"""Answer forms for the math verifier: (reference, response) pairs in the shapes MATH-style data and
model outputs take. Each case is judged by the service and by math-verify called directly; where the
service reads a reference differently on purpose, the case names the reading and the reason.

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

from dataclasses import dataclass


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

CASES: list[AnswerCase] = [
    # Integers and signs.
    AnswerCase("integer", "$4$", "so the answer is \\boxed{4}."),
    AnswerCase("integer_wrong", "$4$", "\\boxed{5}"),
    AnswerCase("negative", "$-3$", "\\boxed{-3}"),
    AnswerCase("integer_unboxed_sentence", "$5$", "The answer is 5."),
    AnswerCase("no_answer_in_response", "$5$", "I could not solve it."),
    AnswerCase("bare_integer", "420", "\\boxed{420}"),
    AnswerCase("bare_integer_wrong", "420", "\\boxed{42}"),
    # Fractions, mixed numbers, decimals.
    AnswerCase("frac_vs_dfrac", "$\\frac{1}{9}$", "\\boxed{\\dfrac{1}{9}}"),
    AnswerCase("frac_vs_slash", "$\\frac{1}{9}$", "\\boxed{1/9}"),
    AnswerCase("frac_vs_truncated_decimal", "$\\frac{1}{9}$", "\\boxed{0.1111}"),
    AnswerCase("bare_frac", "\\frac{1}{9}", "\\boxed{1/9}"),
    AnswerCase("bare_dfrac_vs_decimal", "\\dfrac{3}{4}", "\\boxed{0.75}",
               reading="$\\dfrac{3}{4}$", reason=BARE_LATEX),
    AnswerCase("mixed_number", "$12\\frac{3}{5}$", "\\boxed{12 \\frac{3}{5}}"),
    AnswerCase("bare_mixed_number_vs_improper", "12\\frac{3}{5}", "\\boxed{\\frac{63}{5}}",
               reading="$12\\frac{3}{5}$", reason=BARE_LATEX),
    AnswerCase("decimal_vs_frac", "$0.25$", "\\boxed{\\frac14}"),
    AnswerCase("trailing_zero", "$2.5$", "\\boxed{2.50}"),
    # Percentages.
    AnswerCase("percent_both", "$25\\%$", "\\boxed{25\\%}"),
    AnswerCase("percent_vs_number", "$25\\%$", "\\boxed{25}"),
    AnswerCase("percent_vs_fraction", "$25\\%$", "\\boxed{0.25}"),
    AnswerCase("bare_percent_vs_fraction", "25\\%", "\\boxed{0.25}",
               reading="$25\\%$", reason=BARE_LATEX),
    # Decimal commas and thousands separators (the two readings of a comma inside a number).
    AnswerCase("decimal_comma_vs_point", "2,50", "\\boxed{2.5}"),
    AnswerCase("decimal_comma_vs_wrong", "2,50", "\\boxed{2.05}"),
    AnswerCase("decimal_comma_vs_list", "2,50", "\\boxed{2, 50}"),
    AnswerCase("decimal_comma_leading_zero", "0,125", "\\boxed{0.125}"),
    AnswerCase("decimal_comma_negative", "-3,5", "\\boxed{-3.5}"),
    AnswerCase("decimal_comma_long_fraction", "3,14159", "\\boxed{3.14159}",
               reading="$3.14159$", reason=DECIMAL_COMMA),
    AnswerCase("thousands_vs_plain", "1,000", "\\boxed{1000}"),
    AnswerCase("thousands_both", "1,000", "\\boxed{1,000}"),
    AnswerCase("thousands_wrong", "1,000", "\\boxed{1}"),
    AnswerCase("thousands_millions", "12,345,678", "\\boxed{12345678}"),
    AnswerCase("thousands_with_decimals", "1,000.5", "\\boxed{1000.5}"),
    # Lists of solutions (MATH: "Enter all the solutions, separated by commas").
    AnswerCase("delimited_list_reordered", "$1, -2$", "\\boxed{-2,1}"),
    AnswerCase("delimited_list_partial", "$1, -2$", "\\boxed{-2}"),
    AnswerCase("bare_list", "1, -2", "\\boxed{1, -2}", reading="$1, -2$", reason=BARE_LIST),
    AnswerCase("bare_list_reordered", "1, -2", "\\boxed{-2, 1}", reading="$1, -2$",
               reason=BARE_LIST),
    AnswerCase("bare_list_partial", "1, -2", "\\boxed{-2}", reading="$1, -2$", reason=BARE_LIST),
    AnswerCase("bare_list_no_spaces", "1,2,3", "\\boxed{3, 2, 1}", reading="$1,2,3$",
               reason=BARE_LIST),
    # Times and ratios.
    AnswerCase("time_itself", "$10:30$", "$10:30$"),
    AnswerCase("time_on_the_hour_itself", "$10:00$", "$10:00$"),
    AnswerCase("time_on_the_hour_in_text", "$5:00$", "The meeting starts at $5:00$."),
    AnswerCase("time_on_the_hour_wrong", "$10:00$", "$11:00$"),
    AnswerCase("time_wrong", "$10:30$", "\\boxed{10:45}"),
    AnswerCase("bare_time", "10:30", "\\boxed{10:30}", reading="$10:30$", reason=BARE_LATEX),
    # Degrees and units.
    AnswerCase("degrees_both", "$30^\\circ$", "\\boxed{30^\\circ}"),
    AnswerCase("degrees_vs_number", "$30^\\circ$", "\\boxed{30}"),
    AnswerCase("degrees_vs_radians", "$30^\\circ$", "\\boxed{\\frac{\\pi}{6}}"),
    AnswerCase("unit_cm", "$5\\text{ cm}$", "\\boxed{5\\text{ cm}}"),
    AnswerCase("unit_dropped", "$5\\text{ cm}$", "\\boxed{5}"),
    AnswerCase("bare_unit", "5\\text{ cm}", "\\boxed{5}"),
    AnswerCase("money_delimited", "$\\$18.90$", "\\boxed{\\$18.90}"),
    AnswerCase("bare_money", "\\$18.90", "\\boxed{18.90}", reading="$\\$18.90$",
               reason=ESCAPED_DOLLAR),
    # Sets, tuples, intervals, inequalities, equations.
    AnswerCase("set_reordered", "$\\{1, 2\\}$", "\\boxed{\\{2, 1\\}}"),
    AnswerCase("tuple", "$(1, 2)$", "\\boxed{(1, 2)}"),
    AnswerCase("tuple_swapped", "$(1, 2)$", "\\boxed{(2, 1)}"),
    AnswerCase("interval_half_open", "$[0, 1)$", "\\boxed{[0, 1)}"),
    AnswerCase("interval_wrong_end", "$[0, 1)$", "\\boxed{[0, 1]}"),
    AnswerCase("bare_interval", "(-\\infty, 2]", "\\boxed{(-\\infty, 2]}",
               reading="$(-\\infty, 2]$", reason=BARE_LATEX),
    AnswerCase("interval_union", "$(-\\infty, 2) \\cup (3, \\infty)$",
               "\\boxed{(-\\infty,2)\\cup(3,\\infty)}"),
    AnswerCase("inequality", "$x > 2$", "\\boxed{x > 2}"),
    AnswerCase("inequality_vs_interval", "$x > 2$", "\\boxed{(2, \\infty)}"),
    AnswerCase("equation", "$y = 2x + 1$", "\\boxed{y = 2x + 1}"),
    AnswerCase("equation_rhs_only", "$y = 2x + 1$", "\\boxed{2x + 1}"),
    # Matrices and vectors.
    AnswerCase("matrix", "$\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}$",
               "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}"),
    AnswerCase("matrix_wrong", "$\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}$",
               "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}}"),
    AnswerCase("bare_vector", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}",
               "\\boxed{\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}}",
               reading="$\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}$", reason=BARE_LATEX),
    # Text answers and choices.
    AnswerCase("text_answer", "$\\text{Paris}$", "\\boxed{\\text{Paris}}"),
    AnswerCase("text_answer_wrong", "$\\text{Paris}$", "\\boxed{\\text{Lyon}}"),
    AnswerCase("bare_text_answer", "\\text{even}", "\\boxed{\\text{even}}",
               reading="$\\text{even}$", reason=BARE_TEXT),
    AnswerCase("bare_text_answer_wrong", "\\text{even}", "\\boxed{\\text{odd}}"),
    AnswerCase("choice_letter", "$\\text{(C)}$", "\\boxed{C}"),
    # Radicals, constants, complex numbers, bases, expressions.
    AnswerCase("radical_simplified", "$2\\sqrt{3}$", "\\boxed{\\sqrt{12}}"),
    AnswerCase("bare_radical_fraction", "\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{1}{2}\\sqrt{3}}",
               reading="$\\frac{\\sqrt{3}}{2}$", reason=BARE_LATEX),
    AnswerCase("pi_multiple", "$7\\pi$", "\\boxed{7\\pi}"),
    AnswerCase("pi_vs_decimal", "$7\\pi$", "\\boxed{21.99}"),
    AnswerCase("bare_pi_multiple", "7\\pi", "\\boxed{7\\pi}", reading="$7\\pi$",
               reason=BARE_LATEX),
    AnswerCase("bare_pi_vs_coefficient", "7\\pi", "\\boxed{7}", reading="$7\\pi$",
               reason=BARE_LATEX),
    AnswerCase("complex_reordered", "$3 + 4i$", "\\boxed{4i + 3}"),
    AnswerCase("complex_conjugate", "$3 + 4i$", "\\boxed{3 - 4i}"),
    AnswerCase("base_subscript", "$1011_2$", "\\boxed{1011_2}"),
    AnswerCase("bare_expression", "4a-2", "\\boxed{4a-2}", reading="$4a-2$", reason=BARE_LATEX),
    AnswerCase("bare_expression_vs_constant_term", "4a-2", "\\boxed{-2}"),
    AnswerCase("polynomial_factored", "$x^2+2x+1$", "\\boxed{(x+1)^2}"),
    AnswerCase("infinity", "$\\infty$", "\\boxed{\\infty}"),
    AnswerCase("scientific_notation", "$6.02 \\times 10^{23}$", "\\boxed{6.02\\times10^{23}}"),
    AnswerCase("boxed_reference", "\\boxed{\\frac{3}{8}}", "\\boxed{0.375}"),
]
