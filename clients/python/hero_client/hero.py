"""HERO reward math (Hybrid Ensemble Reward Optimization, arXiv 2510.07242).

Pure functions of small float lists: no I/O, no torch, no web framework. Everything the service
returns for a group is computed by :func:`score_group`; the rest of the service only gathers the
verifier verdicts and RM scores that go in.

Standard deviations are population standard deviations (ddof = 0) everywhere, so a group of one
is well defined (std 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .vocabulary import AdvantageKind, Mode, TiePolicy, WeightGap

# Added to the std in GRPO advantages and in the "rm" mode standardisation.
STD_EPS = 1e-6


@dataclass(frozen=True)
class HeroParams:
    """Hyper-parameters of Eq. 3-5; defaults follow the paper's appendix."""

    alpha: float = 0.1
    beta: float = 0.1
    w_min: float = 0.4
    w_max: float = 3.0
    k: float = 6.0
    epsilon: float = 1e-6
    tie_policy: TiePolicy = "bottom"
    weight_gap: WeightGap = "absolute"
    advantage: AdvantageKind = "grpo"


@dataclass(frozen=True)
class GroupReward:
    """Everything computed for one prompt group (lists are per response, in order)."""

    sigma: float | None
    weight: float
    normalized: list[float]
    rewards: list[float]
    advantages: list[float] | None


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def population_std(values: Sequence[float]) -> float:
    mu = mean(values)
    return math.sqrt(math.fsum((v - mu) ** 2 for v in values) / len(values))


def stratified_normalize(
    scores: Sequence[float],
    verified: Sequence[bool],
    *,
    alpha: float = 0.1,
    beta: float = 0.1,
    epsilon: float = 1e-6,
    tie_policy: TiePolicy = "bottom",
) -> list[float]:
    """Eq. 3: min-max normalise RM scores within each verifier stratum, then map each stratum to
    its band: incorrect -> [-alpha, alpha], correct -> [1 - beta, 1 + beta].

    ``tie_policy`` decides u for a stratum whose scores span no more than ``epsilon`` (a single
    response, or tied scores): "bottom" keeps the paper's literal formula (u ~ 0), "middle" puts
    the whole stratum at u = 0.5, the centre of its band.
    """
    if len(scores) != len(verified):
        raise ValueError("scores and verified must have the same length")
    normalized = [0.0] * len(scores)
    for stratum in (False, True):
        members = [i for i, v in enumerate(verified) if bool(v) is stratum]
        if not members:
            continue
        lo = min(scores[i] for i in members)
        hi = max(scores[i] for i in members)
        tied = hi - lo <= epsilon
        for i in members:
            if tied and tie_policy == "middle":
                u = 0.5
            else:
                u = (scores[i] - lo) / (hi - lo + epsilon)
            normalized[i] = (1.0 - beta) + 2.0 * beta * u if stratum else -alpha + 2.0 * alpha * u
    return normalized


def sigmoid(x: float) -> float:
    # Split by sign so neither branch overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def variance_weight(
    sigma: float,
    sigma_ref: float,
    *,
    w_min: float = 0.4,
    w_max: float = 3.0,
    k: float = 6.0,
    weight_gap: WeightGap = "absolute",
) -> float:
    """Eq. 4: w = w_min + (w_max - w_min) * sigmoid(k * gap).

    "absolute" (the paper): gap = sigma - sigma_ref, in raw RM units, so k is scale-dependent.
    "relative": gap = (sigma - sigma_ref) / sigma_ref, scale-free (0 when sigma_ref is 0).
    """
    gap = sigma - sigma_ref
    if weight_gap == "relative":
        gap = gap / sigma_ref if sigma_ref > 0 else 0.0
    # Past |k * gap| = 50 the sigmoid is 0 or 1 to double precision; clamping keeps 0 * inf
    # (k = 0 with an overflowing relative gap) from becoming NaN.
    z = k * max(-1e12, min(1e12, gap))
    return w_min + (w_max - w_min) * sigmoid(z)


def advantages(values: Sequence[float], weight: float, kind: AdvantageKind) -> list[float] | None:
    """Group-relative advantages with the weight applied *after* the group normalisation, so a
    per-group constant weight survives (it cancels in (R - mean(R)) / std(R))."""
    if kind == "none":
        return None
    n = len(values)
    mu = mean(values)
    if kind == "grpo":
        scale = population_std(values) + STD_EPS
        return [weight * (v - mu) / scale for v in values]
    if kind == "dr_grpo":
        return [weight * (v - mu) for v in values]
    if kind == "rloo":
        if n == 1:
            return [0.0]
        total = math.fsum(values)
        return [weight * (v - (total - v) / (n - 1)) for v in values]
    raise ValueError(f"unknown advantage estimator {kind!r}")


def standardize(values: Sequence[float]) -> list[float]:
    mu = mean(values)
    scale = population_std(values) + STD_EPS
    return [(v - mu) / scale for v in values]


def group_sigma(scores: Sequence[float] | None) -> float | None:
    return population_std(scores) if scores else None


def default_sigma_ref(sigmas: Sequence[float | None]) -> float | None:
    """sigma_ref when the request sends none: the mean sigma of the request's groups."""
    known = [s for s in sigmas if s is not None]
    return mean(known) if known else None


def score_group(
    mode: Mode,
    verified: Sequence[bool],
    scores: Sequence[float] | None,
    params: HeroParams,
    sigma_ref: float | None,
) -> GroupReward:
    """Eq. 3-5 for one group, or one of the unweighted ablation modes.

    hero:     normalized = Eq. 3, weight = Eq. 4, reward = weight * normalized
    verifier: reward = v_i, weight 1
    rm:       reward = RM score standardised within the group, weight 1
    ``scores`` may be None only in verifier mode.
    """
    sigma = group_sigma(scores)
    if mode == "verifier":
        normalized = [1.0 if v else 0.0 for v in verified]
        weight = 1.0
    else:
        if scores is None:
            raise ValueError(f"mode {mode!r} needs RM scores")
        if mode == "rm":
            normalized = standardize(scores)
            weight = 1.0
        elif mode == "hero":
            normalized = stratified_normalize(
                scores,
                verified,
                alpha=params.alpha,
                beta=params.beta,
                epsilon=params.epsilon,
                tie_policy=params.tie_policy,
            )
            assert sigma is not None
            weight = variance_weight(
                sigma,
                sigma if sigma_ref is None else sigma_ref,
                w_min=params.w_min,
                w_max=params.w_max,
                k=params.k,
                weight_gap=params.weight_gap,
            )
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return GroupReward(
        sigma=sigma,
        weight=weight,
        normalized=normalized,
        rewards=[weight * x for x in normalized],
        advantages=advantages(normalized, weight, params.advantage),
    )
