"""The scoring pipeline (hero_service.pipeline) in-process, built by the app's own lifespan with
the embedded MiniLM RM and a one-worker math pool: the checks that name fields, dedupe,
verifier ∥ RM, the permit released on every way out, and score = score_locally + combine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Optional

import pytest
from fastapi import FastAPI
from support import app_service, started_app_fixture

from hero_client import hero
from hero_client.schema import RewardsRequest
from hero_service.config import Settings
from hero_service.errors import InputError, Overloaded, ScoringUnavailable, TooManyRollouts
from hero_service.metrics import Metrics
from hero_service.pipeline import Pipeline
from hero_service.reward_models import ScoringItem
from hero_service.verifiers import ExactVerifier, Verdict, Verifier

pytestmark = pytest.mark.anyio

SETTINGS = Settings(verifier_workers=1, max_groups=3, max_responses_per_group=4,
                    max_response_chars=60, max_queued_rollouts=10)
PROMPT = "What is 2+2?"


app = started_app_fixture(SETTINGS)


@pytest.fixture
def pipeline(app: FastAPI) -> Pipeline:
    runtime = app_service(app).runtime
    assert runtime is not None
    return runtime.pipeline


def with_verifier(pipeline: Pipeline, verifier: Verifier) -> Pipeline:
    """The app's pipeline (its model, batcher, metrics, admission) with another verifier."""
    return Pipeline(pipeline.settings, pipeline.reward_model, pipeline.batcher,
                    {verifier.name: verifier}, pipeline.metrics, pipeline.admission)


def group(responses: Sequence[str], reference: Optional[str] = "4", **fields: Any) -> dict:
    return {"prompt": PROMPT, "reference": reference, "responses": list(responses), **fields}


def request(*groups: dict, **fields: Any) -> RewardsRequest:
    return RewardsRequest.model_validate({"groups": list(groups), **fields})


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class RecordingVerifier(ExactVerifier):
    """The real exact verifier, recording the responses it is asked to judge."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def verify(self, reference: Optional[str], responses: Sequence[str]) -> list[Verdict]:
        self.asked.append(list(responses))
        return await super().verify(reference, responses)


class WaitsForTheRewardModel(ExactVerifier):
    """The real exact verifier, answering only after the RM has run a batch: a pipeline that
    verified first and scored afterwards would never get past it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.batches_before = sample(metrics, "hero_batch_size_count")

    async def verify(self, reference: Optional[str], responses: Sequence[str]) -> list[Verdict]:
        async def rm_ran() -> None:
            while sample(self.metrics, "hero_batch_size_count") == self.batches_before:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(rm_ran(), timeout=30)
        return await super().verify(reference, responses)


class CrashingVerifier(ExactVerifier):
    """A verifier breaking its contract (it raises instead of returning "error" verdicts)."""

    async def verify(self, reference: Optional[str], responses: Sequence[str]) -> list[Verdict]:
        raise RuntimeError("verifier crashed")


@pytest.mark.parametrize("body, field, message", [
    ({"groups": [group(["\\boxed{4}"])] * 4}, "groups", "4 groups; the limit is 3"),
    ({"groups": [group(["4"]), group(["4"], group_key="k", group_size=5)]},
     "groups[1].group_size", "group_size 5; the limit is 4"),
    ({"groups": [group(["1", "2", "3", "4", "5"])]},
     "groups[0].responses", "5 responses; the limit is 4"),
    ({"groups": [group(["4", "x" * 61])]},
     "groups[0].responses[1]", "61 characters; the limit is 60"),
    ({"verifier": "math", "groups": [group(["4"]), group(["4"], reference=None)]},
     "groups[1].reference", "the 'math' verifier needs a reference answer"),
    ({"verifier": "none", "groups": [group(["4"], reference=None)]},
     "groups[0].reference", "reward model 'embedded:all-MiniLM-L6-v2' scores against a reference"),
], ids=["groups", "group-size", "responses", "response-chars", "verifier-reference",
        "rm-reference"])
async def test_check_names_the_field_and_takes_no_permit(pipeline, body, field, message):
    req = RewardsRequest.model_validate(body)
    with pytest.raises(InputError) as info:
        pipeline.check(req)
    assert (info.value.status, info.value.field) == (422, field)
    assert message in info.value.message, info.value.message
    with pytest.raises(InputError):
        await pipeline.score(req)
    assert pipeline.admission.held == 0


async def test_rm_scores_need_no_reference_and_skip_the_model(pipeline):
    req = request({"prompt": "p", "responses": ["a", "b", "c"], "rm_scores": [0.5, 0.1, 0.3]},
                  group(["\\boxed{4}", "\\boxed{5}"], id="scored-here"), verifier="none")
    assert pipeline.check(req).name == "none"
    rollouts_before = sample(pipeline.metrics, "hero_batch_size_sum")

    response = await pipeline.score(req)

    brought, scored = response.groups
    assert brought.rm_scores == [0.5, 0.1, 0.3]
    assert brought.verifier_status == ["skipped"] * 3
    assert (brought.id, scored.id) == ("0", "scored-here")
    assert scored.rm_scores is not None and len(scored.rm_scores) == 2
    # Only the second group's two responses went through the model.
    assert sample(pipeline.metrics, "hero_batch_size_sum") - rollouts_before == 2


async def test_identical_responses_are_verified_once_and_scored_once(pipeline):
    recorder = RecordingVerifier()
    deduped_before = sample(pipeline.metrics, "hero_deduplicated_rollouts_total")
    req = request(group(["\\boxed{4}", "\\boxed{4}<|im_end|>", "\\boxed{5}", "\\boxed{4}"]),
                  verifier="exact")

    result = (await with_verifier(pipeline, recorder).score(req)).groups[0]

    # The trailing EOS text is stripped before verifying, so three responses are one answer.
    assert recorder.asked == [["\\boxed{4}", "\\boxed{5}"]]
    assert result.verifier_status == ["correct", "correct", "incorrect", "correct"]
    # The RM sees the texts as sent: responses 0 and 3 are one input, scored once.
    assert sample(pipeline.metrics, "hero_deduplicated_rollouts_total") - deduped_before == 1
    assert result.rm_scores is not None and result.rm_scores[0] == result.rm_scores[3]
    assert result.rewards[0] == result.rewards[3]


async def test_verifier_and_rm_run_side_by_side_and_combine_into_hero(pipeline):
    responses = ["2+2 = \\boxed{4}", "I think \\boxed{5}", "Adding, \\boxed{4}.", "no idea"]
    req = request(group(responses), verifier="exact")
    waiting = WaitsForTheRewardModel(pipeline.metrics)

    response = await with_verifier(pipeline, waiting).score(req)

    result = response.groups[0]
    verdicts = await ExactVerifier().verify("4", responses)
    assert result.verifier_status == [v.status for v in verdicts]
    assert result.verifier_status == ["correct", "incorrect", "correct", "incorrect"]
    model = pipeline.reward_model
    direct = model.forward(model.encode([ScoringItem(PROMPT, r, "4") for r in responses]))
    assert result.rm_scores == pytest.approx(direct, rel=1e-5)
    # One group and no sigma_ref: sigma-bar is the group's own sigma.
    assert response.sigma_ref == pytest.approx(hero.population_std(result.rm_scores))
    expected = hero.score_group("hero", [v.verified for v in verdicts], result.rm_scores,
                                req.params.formula_params(), response.sigma_ref)
    assert result.normalized == pytest.approx(expected.normalized)
    assert result.weight == pytest.approx(expected.weight)
    assert result.rewards == pytest.approx(expected.rewards)
    assert result.advantages == pytest.approx(expected.advantages)
    assert (response.reward_model, response.verifier) == (model.model_id, "exact")


async def test_a_crashing_verifier_releases_the_permit_after_the_rm_finishes(pipeline):
    rollouts_before = sample(pipeline.metrics, "hero_batch_size_sum")
    scored_before = sample(pipeline.metrics, "hero_rollouts_scored_total", mode="hero")
    req = request(group(["\\boxed{4}", "\\boxed{3}", "\\boxed{2}"]), verifier="exact")

    with pytest.raises(RuntimeError, match="verifier crashed"):
        await with_verifier(pipeline, CrashingVerifier()).score(req)

    assert pipeline.admission.held == 0
    # The error came only once the RM's half had its scores (a batch is counted after its
    # forward, before its results are handed back): that work was not orphaned.
    assert sample(pipeline.metrics, "hero_batch_size_sum") - rollouts_before == 3
    assert sample(pipeline.metrics, "hero_rollouts_scored_total", mode="hero") == scored_before


async def test_an_open_breaker_refuses_rm_work_at_once_and_serves_the_rest(pipeline):
    refused_before = sample(pipeline.metrics, "hero_rejected_requests_total",
                            reason="reward_model_unavailable")
    rollouts_before = sample(pipeline.metrics, "hero_batch_size_sum")
    pipeline.batcher.breaker.record_failure("test: the RM is down")
    try:
        with pytest.raises(ScoringUnavailable) as info:
            await pipeline.score(request(group(["\\boxed{4}", "\\boxed{5}"])))
        brought = await pipeline.score(request(group(["\\boxed{4}", "\\boxed{5}"],
                                                     rm_scores=[1.0, 0.0])))
        verifier_only = await pipeline.score(request(group(["\\boxed{4}"]), mode="verifier"))
    finally:
        pipeline.batcher.breaker.record_success()

    assert (info.value.status, info.value.code) == (503, "reward_model_unavailable")
    assert 1 <= (info.value.retry_after_s or 0) <= 2  # the rest of the 2 s cool-down
    assert pipeline.admission.held == 0
    assert sample(pipeline.metrics, "hero_rejected_requests_total",
                  reason="reward_model_unavailable") - refused_before == 1
    assert sample(pipeline.metrics, "hero_batch_size_sum") == rollouts_before  # no backend call
    assert brought.groups[0].verifier_status == ["correct", "incorrect"]
    assert verifier_only.groups[0].rewards == [1.0]


async def test_admission_refuses_what_cannot_fit_and_what_does_not_fit_now(pipeline):
    twelve = request(*[group(["\\boxed{4}"] * 4)] * 3)
    with pytest.raises(TooManyRollouts) as too_many:
        pipeline.admit(twelve, field="query")
    assert (too_many.value.status, too_many.value.field) == (413, "query")
    assert (too_many.value.rollouts, too_many.value.limit) == (12, 10)

    four = request(group(["\\boxed{4}"] * 4))
    with pipeline.admission.try_acquire(8):
        with pytest.raises(Overloaded) as full:
            await pipeline.score(four)
        assert pipeline.admission.held == 8
    assert full.value.message == "8 rollouts in flight (limit 10); retry later"
    assert pipeline.admission.held == 0
    assert (await pipeline.score(four)).groups[0].verified == [True] * 4


async def test_score_is_score_locally_then_combine(pipeline):
    req = request(group(["\\boxed{4}", "\\boxed{5}", "no idea"], id="a"),
                  group(["\\boxed{9}", "\\boxed{3*3}", "\\boxed{6}", "\\boxed{9}"],
                        reference="9", id="b"), verifier="math")
    verifier = pipeline.check(req)
    with pipeline.admit(req):
        local = await pipeline.score_locally(req, verifier)
    assert pipeline.admission.held == 0

    combined = pipeline.combine(req, local, None)
    scored = await pipeline.score(req)

    assert combined.model_dump(exclude={"timings_ms"}) == scored.model_dump(exclude={"timings_ms"})
    assert [g.verifier_status for g in scored.groups] == [
        ["correct", "incorrect", "no_answer"], ["correct", "correct", "incorrect", "correct"]]
    # Without a sigma_ref in the request, sigma-bar is the mean sigma of its groups...
    assert scored.sigma_ref == pytest.approx(hero.mean([g.sigma for g in scored.groups]))
    # ...unless the server passes its running one; a request's own always wins.
    assert pipeline.combine(req, local, 0.05).sigma_ref == 0.05
    own = req.model_copy(update={"params": req.params.model_copy(update={"sigma_ref": 0.2})})
    assert pipeline.combine(own, local, 0.05).sigma_ref == 0.2
    # One group's local results combine to what that group gets inside the whole request.
    alone = RewardsRequest(groups=[req.groups[1]], verifier="math")
    assert pipeline.combine(alone, local.only([1]), 0.05).groups[0] == \
        pipeline.combine(req, local, 0.05).groups[1]
