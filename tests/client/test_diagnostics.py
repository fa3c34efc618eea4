"""The verifier/RM disagreement rule (hero_client.diagnostics): on the dev data's real 72B RM
scores with planted verifier misses, and its invariants on any group."""

from __future__ import annotations

import statistics
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hero_client import diagnostics, hero
from hero_client._score_command import summarize
from hero_client.vocabulary import DisagreementKind, VerifierStatus

FN: DisagreementKind = "likely_false_negative"
FP: DisagreementKind = "likely_false_positive"


def grader_statuses(row: dict) -> list[VerifierStatus]:
    return ["correct" if ok else "incorrect" for ok in row["grader_correct"]]


def best_scored(row: dict) -> int:
    scores = row["rm72b_scores"]
    return max(range(len(scores)), key=scores.__getitem__)


def test_planted_misses_are_flagged_and_no_other_verified_answer_is(dev_rows):
    """The issue's acceptance rule on the grader's labels: in each all-correct group the
    best-scored response is made rejected (as a verifier miss would be); its score stays."""
    planted = flagged_planted = other_verified = flagged_verified = 0
    for row in dev_rows:
        statuses = grader_statuses(row)
        plant = best_scored(row) if all(row["grader_correct"]) else None
        if plant is not None:
            statuses[plant] = "incorrect"
        flags = diagnostics.disagreements(statuses, row["rm72b_scores"])
        assert flags is not None
        for i, (status, flag) in enumerate(zip(statuses, flags)):
            if i == plant:
                planted += 1
                flagged_planted += flag == FN
            elif status == "correct":
                other_verified += 1
                flagged_verified += flag is not None
    assert (planted, other_verified) == (45, 330)
    assert flagged_planted == 45
    assert flagged_verified == 0


def test_unplanted_dev_data_flags_only_where_the_rm_ranks_wrong_answers_with_right_ones(dev_rows):
    """Without planting, only group 28 is flagged: its RM ranks three wrong answers (11, 11, 3)
    at or above the median of the two right ones (4). A flag marks a disagreement, not who is
    wrong; here it is the RM."""
    flagged = {}
    for row in dev_rows:
        flags = diagnostics.disagreements(grader_statuses(row), row["rm72b_scores"])
        assert flags is not None
        hits = [i for i, f in enumerate(flags) if f is not None]
        if hits:
            flagged[row["id"]] = (hits, {flags[i] for i in hits})
    assert flagged == {"math_cot_100/28": ([0, 1, 6], {FN})}


def test_an_all_rejected_group_is_not_flagged(dev_rows):
    """Dev group 3: a malformed reference rejects eight right answers alike; nothing inside the
    group tells them apart, so no flag (see the module docstring for why no cross-group rule)."""
    row = next(r for r in dev_rows if not any(r["grader_correct"]))
    assert row["reference"] == "4:30p.."
    assert diagnostics.disagreements(grader_statuses(row), row["rm72b_scores"]) == [None] * 8


def test_one_rejected_answer_scored_high_never_flags_the_verified_ones():
    statuses: list[VerifierStatus] = ["correct"] * 7 + ["incorrect"]
    scores = [3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 9.0]
    assert diagnostics.disagreements(statuses, scores) == [None] * 7 + [FN]


def test_a_verified_answer_scored_among_the_rejected_is_a_likely_false_positive():
    statuses: list[VerifierStatus] = ["correct", "correct", "correct", "incorrect", "no_answer"]
    scores = [2.0, 2.2, -1.5, -1.0, -2.0]
    assert diagnostics.disagreements(statuses, scores) == [None, None, FP, None, None]


def test_a_lone_verified_answer_is_never_a_false_positive():
    """With one verified answer, "below the verified median" cannot hold: the RM disliking the
    only verified answer is as likely the RM's mistake."""
    statuses: list[VerifierStatus] = ["correct", "incorrect", "incorrect", "incorrect"]
    assert diagnostics.disagreements(statuses, [-5.0, 1.0, 2.0, 3.0]) == [None, FN, FN, FN]


def test_timeouts_and_errors_are_in_neither_stratum_and_never_flagged():
    statuses: list[VerifierStatus] = ["correct", "correct", "timeout", "error", "incorrect"]
    # Without the timeout and the error, the verified median is 1.5: 1.4 stays unflagged.
    assert diagnostics.disagreements(statuses, [1.0, 2.0, 9.0, 9.0, 1.4]) == [None] * 5
    assert diagnostics.disagreements(statuses, [1.0, 2.0, -9.0, -9.0, 1.5]) == [None] * 4 + [FN]


def test_no_rm_scores_means_no_flags_at_all():
    """Mode verifier: there is nothing to disagree with."""
    assert diagnostics.disagreements(["correct", "incorrect"], None) is None


def test_tied_scores_flag_nothing():
    """A constant RM says nothing; without the guard every rejected answer would tie with the
    verified median and be flagged."""
    statuses: list[VerifierStatus] = ["correct", "correct", "incorrect", "incorrect"]
    assert diagnostics.disagreements(statuses, [0.5] * 4) == [None] * 4


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 RM scores for 2 verifier statuses"):
        diagnostics.disagreements(["correct", "incorrect"], [1.0, 2.0, 3.0])


score_st = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
status_st = st.sampled_from(get_args(VerifierStatus))


@st.composite
def groups(draw, integral: bool = False):
    n = draw(st.integers(1, 16))
    values = st.integers(-1000, 1000).map(float) if integral else score_st
    return (draw(st.lists(status_st, min_size=n, max_size=n)),
            draw(st.lists(values, min_size=n, max_size=n)))


@given(groups())
def test_flags_follow_the_strata(group):
    statuses, scores = group
    flags = diagnostics.disagreements(statuses, scores)
    assert flags is not None and len(flags) == len(statuses)
    verified = [s for s, st_ in zip(scores, statuses) if st_ == "correct"]
    for status, score, flag in zip(statuses, scores, flags):
        if flag == FN:
            assert status in ("incorrect", "no_answer")
            assert score >= statistics.median(verified)
        elif flag == FP:
            assert status == "correct"
        else:
            assert flag is None
    # False positives: never more than half the verified answers.
    assert sum(f == FP for f in flags) <= len(verified) / 2
    if not verified:
        assert flags == [None] * len(flags)


@given(groups(integral=True), st.integers(-4, 8), st.integers(-1000, 1000))
def test_flags_do_not_depend_on_the_rm_scale(group, exponent, shift):
    """RM scales differ by prompt and by model: only the order inside the group may matter.
    (Integral scores, a power-of-two scale and an integral shift keep the arithmetic exact, so a
    score equal to a median stays equal.)"""
    statuses, scores = group
    moved = [s * 2.0 ** exponent + shift for s in scores]
    assert diagnostics.disagreements(statuses, moved) == diagnostics.disagreements(statuses,
                                                                                   scores)


def test_the_cli_summary_counts_the_flags_and_the_groups_without_verifier_signal(dev_rows):
    """``hero-rewards score --summary`` over result lines as the service writes them (HERO and
    the flags computed here from the dev data's grader labels, 72B scores and planted misses)."""
    results = []
    for row in dev_rows:
        statuses = grader_statuses(row)
        if all(row["grader_correct"]):
            statuses[best_scored(row)] = "incorrect"
        verified = [s == "correct" for s in statuses]
        scored = hero.score_group("hero", verified, row["rm72b_scores"], hero.HeroParams(), 1.0)
        results.append({
            "id": row["id"], "verifier_status": statuses, "verified": verified,
            "rewards": scored.rewards, "weight": scored.weight, "advantages": scored.advantages,
            "disagreement": diagnostics.disagreements(statuses, row["rm72b_scores"])})
    summary = summarize(results, 1.0)
    # 45 planted misses, and group 28's three wrong answers its RM likes (see above).
    assert summary["disagreements"] == {FN: 48, FP: 0}
    # Planting left one group whose verdicts are all alike: the all-wrong group 3, where the RM
    # still orders the answers.
    assert summary["verifier_no_signal_groups"] == {
        "all_correct": {"reward_signal": 0, "no_reward_signal": 0},
        "all_wrong": {"reward_signal": 1, "no_reward_signal": 0}}
    results[3]["disagreement"] = None  # mode verifier: no flags at all
    results[3]["rewards"] = [0.0] * 8
    assert summarize(results, 1.0)["verifier_no_signal_groups"]["all_wrong"] == {
        "reward_signal": 0, "no_reward_signal": 1}
