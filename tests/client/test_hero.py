"""Property tests of the HERO math (hero_client.hero): every invariant of Eq. 3-5."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hero_client import hero

scores_st = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
band_st = st.floats(min_value=0.0, max_value=0.45)


@st.composite
def groups(draw, min_size: int = 1, max_size: int = 16):
    n = draw(st.integers(min_size, max_size))
    scores = draw(st.lists(scores_st, min_size=n, max_size=n))
    verified = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return scores, verified


@given(groups(), band_st, band_st, st.sampled_from(["bottom", "middle"]))
def test_normalized_scores_stay_in_their_bands(group, alpha, beta, tie_policy):
    scores, verified = group
    out = hero.stratified_normalize(scores, verified, alpha=alpha, beta=beta, tie_policy=tie_policy)
    tol = 1e-9
    for x, v in zip(out, verified):
        if v:
            assert 1 - beta - tol <= x <= 1 + beta + tol
        else:
            assert -alpha - tol <= x <= alpha + tol


@given(groups(min_size=2), band_st, band_st)
def test_every_correct_response_outranks_every_incorrect_one(group, alpha, beta):
    scores, verified = group
    assume(any(verified) and not all(verified))
    out = hero.stratified_normalize(scores, verified, alpha=alpha, beta=beta)
    worst_correct = min(x for x, v in zip(out, verified) if v)
    best_incorrect = max(x for x, v in zip(out, verified) if not v)
    assert worst_correct > best_incorrect
    # ...and the weighted rewards keep that order (w > 0 scales both strata alike).
    params = hero.HeroParams(alpha=alpha, beta=beta)
    result = hero.score_group("hero", verified, scores, params, 1.0)
    if result.weight > 0:
        assert min(r for r, v in zip(result.rewards, verified) if v) > max(
            r for r, v in zip(result.rewards, verified) if not v)


@given(groups(min_size=2))
def test_rm_orders_responses_inside_a_stratum(group):
    scores, verified = group
    out = hero.stratified_normalize(scores, verified)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if verified[i] == verified[j] and scores[i] < scores[j]:
                assert out[i] <= out[j]


@given(st.lists(st.booleans(), min_size=1, max_size=10), scores_st)
def test_tied_strata_follow_the_tie_policy(verified, score):
    scores = [score] * len(verified)
    bottom = hero.stratified_normalize(scores, verified, alpha=0.1, beta=0.1, tie_policy="bottom")
    middle = hero.stratified_normalize(scores, verified, alpha=0.1, beta=0.1, tie_policy="middle")
    for b, m, v in zip(bottom, middle, verified):
        assert b == pytest.approx(0.9 if v else -0.1)  # the paper's literal formula: u = 0
        assert m == pytest.approx(1.0 if v else 0.0)   # centre of the band: u = 0.5


def test_singleton_strata_and_groups_of_one():
    out = hero.stratified_normalize([3.0, 7.0], [True, False], alpha=0.1, beta=0.1)
    assert out == pytest.approx([0.9, -0.1])
    result = hero.score_group("hero", [True], [2.5], hero.HeroParams(), None)
    assert result.sigma == 0.0
    assert result.rewards == pytest.approx([result.weight * 0.9])
    assert result.advantages == [0.0]
    for kind in ("grpo", "dr_grpo", "rloo"):
        assert hero.advantages([0.9], 2.0, kind) == [0.0]


def test_min_max_endpoints_hit_the_band_edges():
    out = hero.stratified_normalize([1.0, 2.0, 3.0, 10.0, 20.0], [False, False, False, True, True],
                                    alpha=0.05, beta=0.1)
    assert out[0] == pytest.approx(-0.05) and out[2] == pytest.approx(0.05, abs=1e-6)
    assert out[1] == pytest.approx(0.0, abs=1e-6)
    assert out[3] == pytest.approx(0.9) and out[4] == pytest.approx(1.1, abs=1e-6)


sigma_st = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@given(sigma_st, sigma_st, st.floats(0.0, 2.0), st.floats(0.0, 5.0), st.floats(0.0, 20.0),
       st.sampled_from(["absolute", "relative"]))
def test_weight_is_within_bounds(sigma, ref, w_min, extra, k, gap):
    w = hero.variance_weight(sigma, ref, w_min=w_min, w_max=w_min + extra, k=k, weight_gap=gap)
    assert w_min - 1e-12 <= w <= w_min + extra + 1e-12


@given(sigma_st, sigma_st, sigma_st, st.sampled_from(["absolute", "relative"]))
def test_weight_is_monotone_in_sigma(a, b, ref, gap):
    lo, hi = sorted((a, b))
    low = hero.variance_weight(lo, ref, weight_gap=gap)
    assert low <= hero.variance_weight(hi, ref, weight_gap=gap)


def test_weight_midpoint_and_scale_dependence():
    # sigma == sigma_ref -> sigmoid(0) -> the midpoint of [w_min, w_max].
    assert hero.variance_weight(0.7, 0.7) == pytest.approx((0.4 + 3.0) / 2)
    # With k = 6 in absolute units, one unit of gap already saturates the sigmoid...
    assert hero.variance_weight(11.0, 10.0) > 0.99 * 3.0
    # ...while the relative gap is scale-free: the same 10 % gap at any scale, the same weight.
    assert hero.variance_weight(11.0, 10.0, weight_gap="relative") == pytest.approx(
        hero.variance_weight(0.11, 0.10, weight_gap="relative"))


def test_sigmoid_is_stable_for_large_arguments():
    assert hero.sigmoid(1e6) == 1.0 and hero.sigmoid(-1e6) == 0.0


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=12),
       st.floats(min_value=0.1, max_value=5.0))
def test_weight_cancels_under_grpo_normalisation_but_survives_in_advantages(values, w):
    """The pitfall of DESIGN §1: a per-group constant w cancels in (R - mean R) / std R."""
    assume(hero.population_std(values) > 1e-3)
    rewards = [w * v for v in values]

    def grpo_of(xs):  # what a GRPO trainer does with the rewards it is given
        mu, sd = hero.mean(xs), hero.population_std(xs)
        return [(x - mu) / sd for x in xs]

    assert grpo_of(rewards) == pytest.approx(grpo_of(values), rel=1e-6, abs=1e-9)  # w is gone
    returned = hero.advantages(values, w, "grpo")
    unweighted = hero.advantages(values, 1.0, "grpo")
    assert returned == pytest.approx([w * a for a in unweighted], rel=1e-9, abs=1e-12)  # w stays


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=12), st.floats(0.1, 5.0))
def test_advantage_estimators(values, w):
    n = len(values)
    mu = sum(values) / n
    assert hero.advantages(values, w, "dr_grpo") == pytest.approx([w * (v - mu) for v in values],
                                                                 abs=1e-9)
    rloo = hero.advantages(values, w, "rloo")
    for i, v in enumerate(values):
        others = (sum(values) - v) / (n - 1)
        assert rloo[i] == pytest.approx(w * (v - others), abs=1e-9)
    if hero.population_std(values) > 1e-3:
        assert sum(hero.advantages(values, w, "grpo")) == pytest.approx(0.0, abs=1e-6)
    assert hero.advantages(values, w, "none") is None


def test_modes_share_one_shape():
    verified = [True, False, True, False]
    scores = [2.0, 1.0, 3.0, 0.5]
    params = hero.HeroParams()
    h = hero.score_group("hero", verified, scores, params, 0.5)
    v = hero.score_group("verifier", verified, None, params, None)
    r = hero.score_group("rm", verified, scores, params, None)
    assert v.weight == 1.0 and v.rewards == [1.0, 0.0, 1.0, 0.0]
    assert r.weight == 1.0 and hero.mean(r.rewards) == pytest.approx(0.0, abs=1e-9)
    assert hero.population_std(r.rewards) == pytest.approx(1.0, abs=1e-5)
    assert h.sigma == pytest.approx(hero.population_std(scores))
    assert h.rewards == pytest.approx([h.weight * x for x in h.normalized])
    for result in (h, v, r):
        assert len(result.rewards) == len(result.normalized) == len(result.advantages) == 4
    with pytest.raises(ValueError):
        hero.score_group("rm", verified, None, params, None)


@given(groups(min_size=1, max_size=8), st.floats(0.0, 50.0))
@settings(max_examples=200)
def test_hero_rewards_are_finite(group, ref):
    scores, verified = group
    result = hero.score_group("hero", verified, scores, hero.HeroParams(), ref)
    assert all(math.isfinite(x) for x in result.rewards + result.advantages)


@given(st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=8), st.data(),
       st.floats(0.0, 1e9), st.floats(0.0, 1e3), st.floats(0.0, 1e3), st.floats(0.0, 1e3),
       st.sampled_from(["absolute", "relative"]), st.sampled_from(["grpo", "dr_grpo", "rloo"]))
def test_extreme_but_allowed_parameters_stay_finite(scores, data, ref, w_a, w_b, k, gap, adv):
    """The wire schema's bounds (|rm score| <= 1e9, weights and k <= 1e3) keep outputs finite."""
    verified = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    params = hero.HeroParams(w_min=min(w_a, w_b), w_max=max(w_a, w_b), k=k, weight_gap=gap,
                             advantage=adv)
    result = hero.score_group("hero", verified, scores, params, ref)
    values = result.rewards + result.advantages + result.normalized + [result.weight, result.sigma]
    assert all(math.isfinite(x) for x in values)


def test_default_sigma_ref_is_the_request_mean():
    assert hero.default_sigma_ref([1.0, None, 3.0]) == 2.0
    assert hero.default_sigma_ref([None]) is None
