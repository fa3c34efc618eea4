"""Verifier plug-ins: one interface (:class:`Verifier`), four implementations."""

from __future__ import annotations

from .base import Status, Verdict, Verifier
from .math import MathVerifier
from .text import ExactVerifier, NoVerifier, NumericVerifier

__all__ = [
    "Status",
    "Verdict",
    "Verifier",
    "MathVerifier",
    "ExactVerifier",
    "NumericVerifier",
    "NoVerifier",
]
