"""Answers that hang or explode math parsers. Each case is (name, response text); the texts are
built here because some are megabytes long."""

from __future__ import annotations

HOSTILE_CASES: list[tuple[str, str]] = [
    ("power_tower", "\\boxed{10^{10^{10^{10}}}}"),
    ("power_tower_9", "\\boxed{9^{9^{9^{9^{9}}}}}"),
    ("factorial_tower", "\\boxed{((10!)!)!}"),
    ("big_factorial", "\\boxed{99999999!}"),
    ("nested_braces_5000", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"),
    ("nested_fracs", "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}"),
    ("nested_parens", "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"),
    ("megabyte_answer", "\\boxed{" + "1" * 1_000_000 + "}"),
    ("megabyte_text", "so the answer is " + "x + " * 250_000 + "1"),
    ("many_boxes", "\\boxed{1}" * 20_000),
    ("boxed_bomb", "\\boxed{\\boxed{\\boxed{" * 2000 + "1" + "}}}" * 2000),
    ("malformed_latex", "\\boxed{\\frac{1}{\\sqrt{}}^{_}^{}\\left(\\right.\\begin{matrix}&&\\\\"),
    ("unclosed_environment", "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4"),
    ("unicode_junk", "\\boxed{\u202e\u0000\ud7ff\U0001f4a9\u200b\ufeff\u0301" * 200 + "}"),
    ("huge_matrix", "\\boxed{\\begin{pmatrix}" + " \\\\ ".join(["&".join(["x"] * 60)] * 60)
     + "\\end{pmatrix}}"),
    ("deep_exponent_chain", "\\boxed{" + "2^{" * 500 + "2" + "}" * 500 + "}"),
    ("long_sum", "\\boxed{" + "+".join(f"x_{{{i}}}" for i in range(20_000)) + "}"),
    ("huge_integer_power", "\\boxed{2^{2^{64}}}"),
    # Quadratic for a brace matcher that scans forward from every opening (minutes at this size).
    ("unclosed_boxes_27000", "\\boxed{" * 27_000),
    ("unclosed_fboxes_then_one_closed", "\\fbox{" * 27_000 + "8}"),
    ("open_braces_then_box", "{" * 200_000 + "\\boxed{8}"),
]
