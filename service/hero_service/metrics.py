"""Prometheus metrics. Each app owns its registry (several apps can live in one test process).

``hero_queue_depth`` — rollouts admitted and not yet scored — is the autoscaling signal: the
scoring backlog only; requests parked waiting for their group are not in it
(``hero_group_waiting_requests``)."""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hero_client.schema import GroupResult
from hero_client.vocabulary import DisagreementKind, Mode

QUEUE_DEPTH_METRIC = "hero_queue_depth"
# Rewards further apart than this within a group are a learning signal (as the CLI's summary).
REWARD_SPREAD_SIGNAL = 1e-9

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# HERO weights lie in [w_min, w_max] (defaults 0.4 .. 3.0).
_WEIGHT_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 5.0, 10.0)
# HERO rewards: w * [-alpha, alpha] and w * [1 - beta, 1 + beta]; mode rm: z-scores.
_REWARD_BUCKETS = (-3.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5,
                   3.0, 4.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hero_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
            registry=r)
        self.request_seconds = Histogram(
            "hero_request_duration_seconds", "request latency", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.rollouts_scored = Counter(
            "hero_rollouts_scored", "rollouts given a reward", ["mode"], registry=r)
        self.verifier_outcomes = Counter(
            "hero_verifier_outcomes", "verifier verdicts by status", ["verifier", "status"],
            registry=r)
        self.verifier_worker_failures = Counter(
            "hero_verifier_worker_failures", "verifier tasks whose worker was killed (hard "
            "timeout) or died; their responses are retried one by one", ["reason"], registry=r)
        self.queue_depth = Gauge(
            QUEUE_DEPTH_METRIC, "rollouts admitted and not yet answered (autoscaling signal)",
            registry=r)
        self.batch_queue_depth = Gauge(
            "hero_batch_queue_depth", "rollouts waiting for or inside the RM batcher", registry=r)
        self.batch_size = Histogram(
            "hero_batch_size", "rollouts per RM forward batch", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "hero_batch_tokens", "padded tokens per RM forward batch", buckets=_TOKEN_BUCKETS,
            registry=r)
        self.padding_ratio = Histogram(
            "hero_batch_padding_ratio", "share of padded tokens in a batch",
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r)
        self.forward_seconds = Histogram(
            "hero_model_forward_seconds", "RM forward time per batch", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.oom_splits = Counter(
            "hero_batch_oom_splits", "batches split in half after out-of-memory", registry=r)
        self.failure_splits = Counter(
            "hero_batch_failure_splits", "batches split in half to isolate an input that failed",
            registry=r)
        self.rm_breaker_state = Gauge(
            "hero_rm_breaker_state", "reward-model circuit breaker: 0 closed, 1 half-open "
            "(probing), 2 open (RM work refused with 503)", registry=r)
        self.rm_breaker_transitions = Counter(
            "hero_rm_breaker_transitions", "reward-model circuit breaker state changes",
            ["to"], registry=r)
        self.rm_unavailable_batches = Counter(
            "hero_rm_unavailable_batches", "RM batches failed whole (timeout, unreachable, 5xx), "
            "not split", registry=r)
        self.deduplicated_rollouts = Counter(
            "hero_deduplicated_rollouts", "rollouts that shared an identical in-flight RM input",
            registry=r)
        self.rejected = Counter(
            "hero_rejected_requests", "requests refused before scoring", ["reason"], registry=r)
        self.sigma_ref = Gauge(
            "hero_sigma_ref_running", "server-side running mean of group sigma (get_reward)",
            registry=r)
        self.sigma_ref_by_run = Gauge(
            "hero_sigma_ref_by_run", "server-side running sigma-bar per run (group store)",
            ["run"], registry=r)
        self.partial_groups = Counter(
            "hero_partial_groups", "assembled groups closed at their deadline before N members "
            "arrived (counted once, by the replica that closed them)", registry=r)
        self.group_waiting_requests = Gauge(
            "hero_group_waiting_requests", "requests of this replica parked waiting for their "
            "group (not part of hero_queue_depth)", registry=r)
        self.group_waiting_members = Gauge(
            "hero_group_waiting_members", "members in open groups across every replica sharing "
            "the group store", registry=r)
        self.group_store_round_trips = Gauge(
            "hero_group_store_round_trips", "group-store round trips made by this replica, by "
            "operation", ["op"], registry=r)
        self.group_store_members = Gauge(
            "hero_group_store_members", "members this replica sent to the group store",
            registry=r)
        self.prompt_mismatches = Counter(
            "hero_get_reward_prompt_mismatch", "/get_reward queries that do not start with their "
            "prompt, by how the response was found (prompt_tail: after the prompt's end, "
            "whole_query: the whole query scored)", ["fallback"], registry=r)
        # Reward diagnostics: counted once per group (an assembled group by the replica that
        # published it), see observe_group.
        self.disagreements = Counter(
            "hero_disagreements", "responses where the verifier and the RM disagree, by kind "
            "(hero_client.diagnostics)", ["kind"], registry=r)
        for kind in get_args(DisagreementKind):
            self.disagreements.labels(kind)  # both kinds shown from the start, at 0
        self.group_weight = Histogram(
            "hero_group_weight", "HERO weight w per group (mode hero)", buckets=_WEIGHT_BUCKETS,
            registry=r)
        self.rewards = Histogram(
            "hero_rewards", "rewards returned, per rollout", ["mode"], buckets=_REWARD_BUCKETS,
            registry=r)
        self.verifier_no_signal_groups = Counter(
            "hero_verifier_no_signal_groups", "groups of 2+ whose verdicts are all alike "
            "(all_correct / all_wrong: the verifier alone gives no learning signal), by whether "
            "the returned rewards still differ (reward_signal)", ["verdicts", "reward_signal"],
            registry=r)
        self.audit_lines = Counter(
            "hero_audit_lines", "lines written to the audit log (--audit-log)", registry=r)
        self.audit_dropped = Counter(
            "hero_audit_dropped", "audit-log lines dropped: the writer's queue was full or the "
            "write failed (requests never wait for the log)", registry=r)

    def observe_group(self, mode: Mode, group: GroupResult) -> None:
        """The reward diagnostics of one whole group; call it once per group."""
        for kind in group.disagreement or ():
            if kind is not None:
                self.disagreements.labels(kind).inc()
        if mode == "hero":
            self.group_weight.observe(group.weight)
        rewards = self.rewards.labels(mode)
        for reward in group.rewards:
            rewards.observe(reward)
        verified = group.verified
        if len(verified) > 1 and all(v == verified[0] for v in verified):
            signal = max(group.rewards) - min(group.rewards) > REWARD_SPREAD_SIGNAL
            self.verifier_no_signal_groups.labels(
                "all_correct" if verified[0] else "all_wrong", str(signal).lower()).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
