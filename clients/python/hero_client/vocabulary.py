"""The service's words, defined once: the wire schema, the HERO math, the verifiers and the
adapters import them from here."""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["hero", "verifier", "rm"]
VerifierName = Literal["math", "exact", "numeric", "none"]
VerifierStatus = Literal["correct", "incorrect", "no_answer", "timeout", "error", "skipped"]
AdvantageKind = Literal["grpo", "dr_grpo", "rloo", "none"]
TiePolicy = Literal["bottom", "middle"]
WeightGap = Literal["absolute", "relative"]
ChatRole = Literal["system", "user", "assistant"]
# Where the verifier and the RM disagree about one response (hero_client.diagnostics).
DisagreementKind = Literal["likely_false_negative", "likely_false_positive"]
DISAGREEMENT_KINDS: tuple[DisagreementKind, ...] = get_args(DisagreementKind)
