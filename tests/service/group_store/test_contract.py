"""The group-store contract, run against both implementations (in-process and a real Redis)."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest
from store_support import RecordingCombine, combine, hero_group, member, until, until_waiting

from hero_client import hero
from hero_service.group_store import (
    Attach,
    ClosedGroup,
    GroupKey,
    GroupScoringFailed,
    GroupStoreOverloaded,
    Member,
    SigmaRule,
)
from hero_service.group_store.base import SigmaState, fold_sigma

pytestmark = pytest.mark.timeout(120)


def key(n: int, identity: str = "q-1", run: str = "exp") -> GroupKey:
    return GroupKey(run, identity, n)


def test_n_members_close_exactly_once_with_the_real_hero_result(stores):
    async def scenario(s):
        store = await s.make(timeout_s=20)
        recorder = RecordingCombine()
        scores = [0.3, 2.5, -1.0, 4.0]
        statuses = ["correct", "incorrect", "incorrect", "correct"]
        started = time.monotonic()
        results = await asyncio.gather(*(
            store.join(key(4), [member(f"m{i}", scores[i], statuses[i])], recorder)
            for i in range(4)))
        return recorder, [r[0] for r in results], time.monotonic() - started
    recorder, outcomes, elapsed = stores.run(scenario)
    assert len(recorder.calls) == 1 and not recorder.calls[0].partial
    assert elapsed < 10  # closed by the 4th member, not by the 20 s deadline
    closed = recorder.calls[0]
    expected = hero_group(closed.members, None)
    order = [m.member_id for m in closed.members]
    for outcome in outcomes:
        i = order.index(outcome.member_id)
        assert outcome.index == i and outcome.reward == expected.rewards[i]
        assert not outcome.partial and outcome.group.weight == expected.weight
    assert sum(o.published_here for o in outcomes) == 1


def test_identical_responses_are_separate_members(stores):
    async def scenario(s):
        store = await s.make(timeout_s=20)
        # Same verdict and score (identical text) but two ids: a group of two, closed full.
        return await asyncio.gather(*(store.join(key(2), [member(mid, 1.5)], combine)
                                      for mid in ("a", "b")))
    (a,), (b,) = stores.run(scenario)
    assert not a.partial and len(a.group.rewards) == 2 and {a.index, b.index} == {0, 1}


def test_member_after_the_group_closed_opens_the_next_group(stores):
    async def scenario(s):
        store = await s.make(timeout_s=20)
        first = await asyncio.gather(*(store.join(key(2), [member(m, v)], combine)
                                       for m, v in (("a", 1.0), ("b", 2.0))))
        second = await asyncio.gather(*(store.join(key(2), [member(m, v)], combine)
                                        for m, v in (("c", 5.0), ("d", 9.0))))
        return first, second
    first, second = stores.run(scenario)
    scores = first[0][0].group.rm_scores
    assert scores is not None and sorted(scores) == [1.0, 2.0]
    assert sorted(second[0][0].group.rm_scores) == [5.0, 9.0]
    assert not second[0][0].partial


def test_group_size_is_part_of_the_key(stores):
    async def scenario(s):
        store = await s.make(timeout_s=20)
        # Same prompt, N = 2 (training) and N = 3 (eval): they must not mix.
        train = [store.join(GroupKey.for_prompt("exp", "p", "4", 2), [member(f"t{i}", i)],
                            combine) for i in range(2)]
        evals = [store.join(GroupKey.for_prompt("exp", "p", "4", 3), [member(f"e{i}", i)],
                            combine) for i in range(3)]
        return await asyncio.gather(*train, *evals)
    outcomes = [o[0] for o in stores.run(scenario)]
    assert [len(o.group.rewards) for o in outcomes] == [2, 2, 3, 3, 3]
    assert not any(o.partial for o in outcomes)


def test_resent_member_reattaches_after_close_and_is_not_added(stores):
    async def scenario(s):
        store = await s.make(timeout_s=20)
        recorder = RecordingCombine()
        first = await asyncio.gather(*(store.join(key(2), [member(m, v)], recorder)
                                       for m, v in (("a", 1.0), ("b", 3.0))))
        # The client's retry of "a" (after a timeout on its side) re-attaches to its result.
        again = await store.join(key(2), [member("a", 1.0)], recorder)
        return recorder, first, again, await store.waiting()
    recorder, first, again, waiting = stores.run(scenario)
    assert len(recorder.calls) == 1  # not scored twice
    original = next(o[0] for o in first if o[0].member_id == "a")
    assert again[0].reward == original.reward and again[0].index == original.index
    assert again[0].group == original.group and not again[0].published_here
    assert waiting == 0


def test_resent_member_while_open_does_not_count_twice(stores):
    async def scenario(s):
        store = await s.make(timeout_s=20)
        recorder = RecordingCombine()
        a1 = asyncio.ensure_future(store.join(key(3), [member("a", 1.0)], recorder))
        await until_waiting(store, 1)
        a2 = asyncio.ensure_future(store.join(key(3), [member("a", 1.0)], recorder))  # retry
        b = asyncio.ensure_future(store.join(key(3), [member("b", 2.0)], recorder))
        await until_waiting(store, 2)
        await asyncio.sleep(0.2)  # room for the retry to arrive; it must not count
        still_open = not (a1.done() or a2.done() or b.done())
        waiting = await store.waiting()
        c = await store.join(key(3), [member("c", 4.0)], recorder)
        return recorder, still_open, waiting, (await a1)[0], (await a2)[0], c[0]
    recorder, still_open, waiting, a1, a2, c = stores.run(scenario)
    assert still_open and waiting == 2  # a, b: the retry of a is no new member
    assert len(recorder.calls) == 1 and [m.member_id for m in recorder.calls[0].members] == [
        "a", "b", "c"]
    assert a1.reward == a2.reward and a1.index == a2.index == 0 and not c.partial


def test_deadline_closes_a_partial_group_that_does_not_move_sigma(stores):
    async def scenario(s):
        store = await s.make(timeout_s=0.4)
        started = time.monotonic()
        outcomes = await asyncio.gather(*(store.join(key(4), [member(m, v)], combine)
                                          for m, v in (("a", 1.0), ("b", 3.0))))
        return outcomes, time.monotonic() - started, await store.sigma_values()
    outcomes, elapsed, sigmas = stores.run(scenario)
    assert all(o[0].partial and o[0].group.partial for o in outcomes)
    assert 0.35 <= elapsed < 5
    assert len(outcomes[0][0].group.rewards) == 2
    assert sigmas == {}  # a partial group does not seed sigma-bar


def test_abandoned_group_is_closed_by_the_next_arrival_after_its_deadline(stores):
    async def scenario(s):
        store = await s.make(timeout_s=0.3)
        # The only waiter goes away (its pod died): nothing is left to close the group...
        orphan = asyncio.ensure_future(store.join(key(3), [member("a", 1.0)], combine))
        await until_waiting(store, 1)
        orphan.cancel()
        await asyncio.sleep(0.5)
        # ...until anything touches the store: the overdue group stops counting at once.
        # Two members in one join arrive together: the count goes 0 -> 2 (or 1 -> 3 if the
        # abandoned group still counted), so waiting for 2 cannot stop half way.
        other = GroupKey("exp", "another prompt", 3)
        waiting_probe = asyncio.ensure_future(
            store.join(other, [member("y", 1.0), member("z", 1.0)], combine))
        waiting = await until_waiting(store, 2)
        # The client's retry of "a" lands (on any replica) and gets the partial result.
        retry = await store.join(key(3), [member("a", 1.0)], combine)
        await waiting_probe
        return waiting, retry[0]
    waiting, retry = stores.run(scenario)
    assert waiting == 2  # only "y" and "z"; the abandoned group no longer holds memory
    assert retry.partial and retry.group.rewards == [retry.reward]


def test_concurrent_joins_from_several_replicas_close_each_group_once(stores):
    n_groups, size, n_replicas = 6, 6, 3

    async def scenario(s):
        replicas = [await s.make(timeout_s=30) for _ in range(n_replicas)]
        recorders = [RecordingCombine() for _ in replicas]
        rng = random.Random(7)
        calls = []
        for g in range(n_groups):
            for i in range(size):
                r = rng.randrange(n_replicas)
                calls.append(replicas[r].join(key(size, f"q{g}"),
                                              [member(f"q{g}-{i}", rng.uniform(-3, 3))],
                                              recorders[r]))
        rng.shuffle(calls)
        outcomes = await asyncio.gather(*calls)
        return recorders, [o[0] for o in outcomes], replicas
    recorders, outcomes, replicas = stores.run(scenario)
    closed = [c for r in recorders for c in r.calls]
    assert len(closed) == n_groups and not any(c.partial for c in closed)
    assert sorted(len(c.members) for c in closed) == [size] * n_groups
    assert sum(o.published_here for o in outcomes) == n_groups
    by_group: dict[str, set] = {}
    for o in outcomes:
        by_group.setdefault(o.member_id.split("-")[0], set()).add(tuple(o.group.rewards))
    assert all(len(v) == 1 for v in by_group.values())  # every replica saw one result
    total_publishes = sum(r.stats().round_trips["publish"] for r in replicas)
    assert total_publishes == n_groups


def test_round_trips_per_member_on_the_per_sample_path(stores):
    size = 8

    async def scenario(s):
        replicas = [await s.make(timeout_s=30) for _ in range(2)]
        await asyncio.gather(*(replicas[i % 2].join(key(size), [member(f"m{i}", i)], combine)
                               for i in range(size)))
        return [r.stats() for r in replicas]
    stats = stores.run(scenario)
    members = sum(s.members for s in stats)
    trips = sum(s.total_round_trips for s in stats)
    assert members == size
    assert trips / members <= 3, [dict(s.round_trips) for s in stats]


def test_waiting_members_are_bounded_and_admission_is_all_or_nothing(stores):
    async def scenario(s):
        store = await s.make(timeout_s=2.0, max_waiting=3)
        waiters = [asyncio.ensure_future(store.join(key(4), [member(m, i)], combine))
                   for i, m in enumerate("abc")]
        await until_waiting(store, 3)
        refused = []
        for members in ([member("x", 0.0)], [member("y", 0.0), member("z", 1.0)]):
            try:
                await store.join(key(2, "other"), members, combine)
            except GroupStoreOverloaded as exc:
                refused.append(exc)
        full = await store.waiting()
        # A re-sent member is no new memory: it re-attaches even at the bound.
        retry = asyncio.ensure_future(store.join(key(4), [member("a", 0.0)], combine))
        await asyncio.sleep(0.1)
        retry_parked = not retry.done()
        outcomes = [o[0] for o in await asyncio.gather(*waiters)]  # closed partial by deadline
        retried = (await retry)[0]
        room = await store.waiting()
        single = await store.join(key(1, "single"), [member("w", 0.0)], combine)
        return refused, full, retry_parked, outcomes, retried, room, single[0]
    refused, full, retry_parked, outcomes, retried, room, single = stores.run(scenario)
    assert len(refused) == 2 and "3 responses are waiting" in refused[0].message
    assert full == 3 and retry_parked
    assert all(o.partial for o in outcomes) and retried.reward == outcomes[0].reward
    assert room == 0 and not single.partial  # closing the group freed the room


def test_an_admitted_request_is_not_refused_half_way(stores):
    """A request of several groups is checked against the bound as a whole before its joins
    (``admitted=True``): a concurrent request that filled the room in between cannot make a
    later group of it fail after earlier ones joined."""
    async def scenario(s):
        store = await s.make(timeout_s=1.5, max_waiting=2)
        filler = asyncio.ensure_future(store.join(key(3, "filler"),
                                                  [member("f", 0.0), member("g", 1.0)], combine))
        await until_waiting(store, 2)
        full = await store.waiting()
        try:
            await store.join(key(2, "late"), [member("x", 0.0)], combine)
            refused = False
        except GroupStoreOverloaded:
            refused = True
        admitted = await asyncio.gather(*(
            store.join(key(2, f"admitted-{g}"), [member("a", 0.0), member("b", 1.0)], combine,
                       admitted=True) for g in range(2)))
        await filler
        return full, refused, admitted
    full, refused, admitted = stores.run(scenario)
    assert full == 2 and refused
    assert all(not o.partial for group in admitted for o in group)


def test_room_comes_back_when_groups_close(stores):
    async def scenario(s):
        store = await s.make(timeout_s=20, max_waiting=2)
        first = await asyncio.gather(*(store.join(key(2), [member(m, i)], combine)
                                       for i, m in enumerate("ab")))
        after = await store.waiting()
        again = await asyncio.gather(*(store.join(key(2), [member(m, i)], combine)
                                       for i, m in enumerate("cd")))
        return first, after, again
    first, after, again = stores.run(scenario)
    assert after == 0 and len(again) == 2 and not again[0][0].partial


def test_members_of_one_call_fill_a_group_and_spill_into_the_next(stores):
    async def scenario(s):
        store = await s.make(timeout_s=0.5)
        return await store.join(key(2), [member(m, i) for i, m in enumerate("abc")], combine)
    a, b, c = stores.run(scenario)
    assert not a.partial and a.group == b.group and {a.index, b.index} == {0, 1}
    assert c.partial and c.group.rewards == [c.reward]  # "c" opened the next group alone


def test_closer_that_dies_before_publishing_is_taken_over_after_its_lease(stores):
    class PodDied(BaseException):
        """Not an Exception: nothing in the store catches it, as with a killed process."""

    def dying_combine(group: ClosedGroup):
        raise PodDied()

    async def scenario(s):
        lease = 0.3
        survivor, doomed = await s.make(timeout_s=20, lease_s=lease), await s.make(
            timeout_s=20, lease_s=lease)
        recorder = RecordingCombine()
        waiters = [asyncio.ensure_future(survivor.join(key(3), [member(m, i)], recorder))
                   for i, m in enumerate("ab")]
        await until_waiting(survivor, 2)
        started = time.monotonic()
        with pytest.raises(PodDied):
            await doomed.join(key(3), [member("c", 7.0)], dying_combine)
        outcomes = [o[0] for o in await asyncio.gather(*waiters)]
        return recorder, outcomes, time.monotonic() - started, lease, await survivor.sigma_values()
    recorder, outcomes, elapsed, lease, sigmas = stores.run(scenario)
    assert len(recorder.calls) == 1 and len(recorder.calls[0].members) == 3
    assert not recorder.calls[0].partial  # the group was complete; only its closer died
    assert lease * 0.9 <= elapsed < 10
    assert sum(o.published_here for o in outcomes) == 1
    assert set(sigmas) == {"exp"}  # moved exactly once
    assert math.isclose(sigmas["exp"], outcomes[0].group.sigma, rel_tol=1e-12)


def test_a_failing_combine_is_reported_to_every_member(stores):
    def broken(group: ClosedGroup):
        raise ZeroDivisionError("bad params")

    async def scenario(s):
        store = await s.make(timeout_s=20)
        return await asyncio.gather(*(store.join(key(2), [member(m, 1.0)], broken)
                                      for m in "ab"), return_exceptions=True)
    errors = stores.run(scenario)
    assert all(isinstance(e, GroupScoringFailed) and "ZeroDivisionError: bad params" in e.message
               for e in errors)


# -- sigma-bar ----------------------------------------------------------------------------------


async def _close_groups(store, run, score_pairs, groups_per_step=None, pause_s=0.0, size=2):
    """Close one full group per score pair, one after another; returns what each combine saw."""
    recorder = RecordingCombine()
    for g, pair in enumerate(score_pairs):
        if pause_s and g:
            await asyncio.sleep(pause_s)
        await asyncio.gather(*(store.join(GroupKey(run, f"g{g}", size), [member(f"{g}-{i}", v)],
                                          recorder, groups_per_step=groups_per_step)
                               for i, v in enumerate(pair)))
    return [c.sigma_ref for c in recorder.calls]


def test_sigma_series_follows_the_batch_time_constant_group_by_group(stores):
    # Population std of (0, 2) is 1, of (0, 4) 2, of (1, 1) 0, of (0, 6) 3.
    pairs = [(0.0, 2.0), (0.0, 4.0), (1.0, 1.0), (0.0, 6.0)]

    async def scenario(s):
        store = await s.make(timeout_s=20)
        seen = await _close_groups(store, "exp", pairs, groups_per_step=2)
        return seen, (await store.sigma_values())["exp"]
    seen, final = stores.run(scenario)
    # By hand: the first step (2 groups) seeds sigma-bar with its mean; then each group moves
    # it with momentum 0.9 ** (1/2), so one step of 2 groups keeps 0.9 of the old value.
    m = 0.9 ** 0.5
    v1 = 1.0
    v2 = (1.0 + 2.0) / 2
    v3 = m * v2 + (1 - m) * 0.0
    v4 = m * v3 + (1 - m) * 3.0
    # each group saw the value before it
    assert seen == [None, v1, v2, pytest.approx(v3, rel=1e-12)]
    assert final == pytest.approx(v4, rel=1e-12)
    # In numbers: m = 0.948683; v3 = 1.423025; v4 = 1.350000 + 0.153950 = 1.503950. The batch
    # rule would give 0.9 * 1.5 + 0.1 * mean(0, 3) = 1.5: same weight 0.9 on the old value, the
    # later group of the step weighted a little more.
    assert final == pytest.approx(1.50395, abs=1e-5)


def test_one_step_of_groups_keeps_the_batch_rules_weight_on_the_old_value():
    # After G groups of the same sigma s, the old value keeps exactly 0.9: the batch rule's
    # sigma-bar <- 0.9 sigma-bar + 0.1 s.
    rule = SigmaRule(groups_per_step=8)
    state = SigmaState()
    for _ in range(8):
        fold_sigma(state, 2.0, 0, rule)
    assert state.value == pytest.approx(2.0)
    for _ in range(8):
        fold_sigma(state, 12.0, 0, rule)
    assert state.value == pytest.approx(0.9 * 2.0 + 0.1 * 12.0, rel=1e-12)


def test_sigma_step_size_is_estimated_from_pauses(stores):
    pairs = [(0.0, 2.0), (0.0, 4.0), (0.0, 6.0)]  # sigmas 1, 2, 3

    async def scenario(s):
        store = await s.make(timeout_s=20, sigma_rule=SigmaRule(step_gap_s=0.5))
        recorder = RecordingCombine()
        # Step 1: two groups back to back; a pause (the trainer's update); step 2: one group.
        for g, pair in enumerate(pairs):
            if g == 2:
                await asyncio.sleep(0.8)
            await asyncio.gather(*(store.join(GroupKey("exp", f"g{g}", 2),
                                              [member(f"{g}-{i}", v)], recorder)
                                   for i, v in enumerate(pair)))
        return (await store.sigma_values())["exp"]
    final = stores.run(scenario)
    m = 0.9 ** (1 / 2)  # the first step had 2 groups
    assert final == pytest.approx(m * 1.5 + (1 - m) * 3.0, rel=1e-12)


def test_singleton_and_partial_groups_do_not_move_sigma_and_runs_are_separate(stores):
    async def scenario(s):
        store = await s.make(timeout_s=0.3)
        await store.join(GroupKey("exp", "single", 1), [member("s", 5.0)], combine)
        await asyncio.gather(*(store.join(GroupKey("exp", "partial", 3), [member(m, v)], combine)
                               for m, v in (("p", 0.0), ("q", 8.0))))
        before = await store.sigma_values()
        await asyncio.gather(*(store.join(GroupKey("exp", "full", 2), [member(m, v)], combine)
                               for m, v in (("f", 0.0), ("g", 2.0))))
        await asyncio.gather(*(store.join(GroupKey("eval", "full", 2), [member(m, v)], combine)
                               for m, v in (("h", 0.0), ("i", 8.0))))
        return before, await store.sigma_values()
    before, after = stores.run(scenario)
    assert before == {}
    assert after == {"exp": pytest.approx(1.0), "eval": pytest.approx(4.0)}


def test_update_sigma_folds_whole_groups_one_at_a_time(stores):
    async def scenario(s):
        store = await s.make(sigma_rule=SigmaRule(groups_per_step=2))
        first = await store.update_sigma("run-a", [1.0, None, 3.0])
        second = await store.update_sigma("run-a", [4.0])
        unchanged = await store.update_sigma("run-a", [None, float("nan")])
        return first, second, unchanged, await store.sigma_values()
    first, second, unchanged, values = stores.run(scenario)
    m = 0.9 ** 0.5
    assert first == pytest.approx(2.0) and second == pytest.approx(m * 2.0 + (1 - m) * 4.0)
    assert unchanged == second and values == {"run-a": pytest.approx(second)}


def test_sigma_values_are_shared_by_every_replica(stores):
    async def scenario(s):
        a, b = await s.make(timeout_s=20), await s.make(timeout_s=20)
        await asyncio.gather(a.join(key(2), [member("x", 0.0)], combine),
                             b.join(key(2), [member("y", 4.0)], combine))
        return await a.sigma_values(), await b.sigma_values()
    seen_a, seen_b = stores.run(scenario)
    assert seen_a == seen_b == {"exp": pytest.approx(2.0)}


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, field", [
    (lambda: Member("", "correct", 1.0), "member_id"),
    (lambda: Member("a", "maybe", 1.0), "verifier_status"),  # type: ignore[arg-type]
    (lambda: Member("a", "correct", float("inf")), "rm_score"),
    (lambda: GroupKey("exp", "q", 0), "group size"),
    (lambda: GroupKey("", "q", 2), "run"),
    (lambda: GroupKey("x" * 300, "q", 2), "run"),
])
def test_bad_keys_and_members_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_duplicate_member_ids_in_one_join_are_rejected(stores):
    async def scenario(s):
        store = await s.make()
        with pytest.raises(ValueError, match="member_id 'a' appears twice"):
            await store.join(key(3), [member("a", 1.0), member("a", 2.0)], combine)
        return await store.waiting()
    assert stores.run(scenario) == 0


def test_expected_rewards_match_hero_directly():
    # The test combine is the service's math: a sanity check of the helper itself.
    ms = (member("a", 1.0), member("b", 0.0, "incorrect"))
    direct = hero.score_group("hero", [True, False], [1.0, 0.0], hero.HeroParams(), None)
    assert hero_group(ms, None).rewards == direct.rewards


def test_the_step_that_answers_marks_the_member_ids_delivered(stores):
    """The claim (a waiter's) or publish (the closer's) that hands a request its group's result
    marks its member ids' attachments delivered in the same round trip: the release afterwards
    costs none, a renewal racing it cannot undo the mark, and the ids stay taken (without making
    the next identical sample wait)."""
    attach = Attach(slots=4, lease_s=5.0, contention_wait_s=5.0)

    async def scenario(s):
        a, b = await s.make(timeout_s=10), await s.make(timeout_s=10)
        ids: list[list[str]] = []
        waiter = asyncio.ensure_future(a.join(key(2), [member("d", 1.0)], combine,
                                              attach=attach, on_attached=ids.append))
        await until(lambda: len(ids) == 1, "the waiter attached")
        closer = await b.join(key(2), [member("e", 0.0, "incorrect")], combine, attach=attach,
                              on_attached=ids.append)
        waited = await waiter
        before = [s.stats().round_trips.get("attach_release", 0) for s in (a, b)]
        await a.renew_attachments(ids[0], 0.2)  # a renewal that lost the race
        await a.release_attachments(ids[0], delivered=True)
        await b.release_attachments(ids[1], delivered=True)
        after = [s.stats().round_trips.get("attach_release", 0) for s in (a, b)]
        await asyncio.sleep(0.4)  # past the renewal's 0.2 s lease: the mark must hold
        started = time.monotonic()
        again = await a.join(key(1, "again"), [member("d", 1.0)], combine,
                             attach=Attach(slots=4, lease_s=5.0, contention_wait_s=5.0),
                             on_attached=ids.append)
        return ids, closer[0], waited[0], before, after, time.monotonic() - started, again[0]
    ids, closer, waited, before, after, elapsed, again = stores.run(scenario)
    assert ids[:2] == [["d#0"], ["e#0"]]
    assert not closer.partial and waited.group == closer.group
    assert after == before  # neither release made a round trip
    # d#0 stays taken as delivered: the next identical sample takes d#1 without waiting
    assert ids[2] == ["d#1"] and elapsed < 2.0 and not again.partial


ATTACH = Attach(slots=4, lease_s=5.0, contention_wait_s=0.6)


def test_a_join_that_attaches_picks_member_ids_in_the_same_step(stores):
    """With Attach the join picks ``base#k`` itself (no separate attach round trip): identical
    responses become separate members, a re-sent one whose lease was released re-attaches to
    its member, delivered ids stay taken, and an earlier id held by a live lease makes the join
    wait one lease's worth before it picks (a dead replica's holder would have lapsed)."""
    async def scenario(s):
        a, b = await s.make(timeout_s=10), await s.make(timeout_s=10)
        seen: list[list[str]] = []
        # two identical responses in one request: two members
        first = asyncio.ensure_future(a.join(key(4), [member("same", 1.0), member("same", 1.0)],
                                             combine, attach=ATTACH, on_attached=seen.append))
        await until(lambda: len(seen) == 1, "the first request attached")
        trips = b.stats().round_trips.get("attach", 0)
        # a third identical one on another replica: an earlier id is held live, so it waits
        started = time.monotonic()
        third = asyncio.ensure_future(b.join(key(4), [member("same", 1.0)], combine,
                                             attach=ATTACH, on_attached=seen.append))
        await asyncio.sleep(0.1)
        waited_early = not seen[1:]
        # the first request's client went away: its ids are released for its retry...
        await a.release_attachments(seen[0])
        first.cancel()
        retry = asyncio.ensure_future(a.join(key(4), [member("same", 1.0), member("same", 1.0)],
                                             combine, attach=ATTACH, on_attached=seen.append))
        await until(lambda: len(seen) == 2, "the retry re-attached")
        last = await b.join(key(4), [member("other", 0.0, "incorrect")], combine,
                            attach=ATTACH, on_attached=seen.append)
        outcomes = [await retry, await third]
        return (seen, waited_early, time.monotonic() - started, outcomes, last,
                b.stats().round_trips.get("attach", 0) - trips)
    seen, waited_early, elapsed, (retry, third), last, attach_trips = stores.run(scenario)
    assert seen[0] == ["same#0", "same#1"]
    assert seen[1] == ["same#0", "same#1"]  # the retry took its own ids back: re-attached
    assert seen[2] == ["other#0"]  # nothing held before it: no wait
    assert waited_early and seen[3] == ["same#2"] and elapsed >= 0.6  # waited, then picked
    group = last[0].group
    assert len(group.rewards) == 4 and not last[0].partial  # 2 + 1 + 1, the retry not counted
    assert {o.member_id for o in retry + third} == {"same#0", "same#1", "same#2"}
    assert attach_trips == 0  # no separate attach round trip


def test_an_attaching_join_skips_delivered_ids_and_refuses_when_every_slot_is_taken(stores):
    async def scenario(s):
        store = await s.make(timeout_s=10)
        one = Attach(slots=2, lease_s=5.0, contention_wait_s=0.0)
        seen: list[list[str]] = []
        done = await store.join(key(1, "solo"), [member("x", 1.0)], combine, attach=one,
                                on_attached=seen.append)
        await store.release_attachments(seen[0], delivered=True)
        again = await store.join(key(1, "solo"), [member("x", 1.0)], combine, attach=one,
                                 on_attached=seen.append)  # sampled again later: a new member
        try:
            await store.join(key(1, "solo"), [member("x", 1.0)], combine, attach=one)
            refused = None
        except GroupStoreOverloaded as exc:
            refused = exc
        return seen, done[0], again[0], refused
    seen, done, again, refused = stores.run(scenario)
    assert seen == [["x#0"], ["x#1"]]  # the delivered x#0 is not re-attached to
    assert not done.partial and not again.partial
    assert refused is not None and "2 identical responses" in refused.message
