"""What a benchmark run measures and for how long: the full run (``make bench``) and the
``--quick`` smoke version, as small records by concern."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Windows:
    measurement_s: float  # callers stop issuing requests after this long (then drain)
    probe_s: float        # a limit probe lasts at least this long (and >= one batch)
    probe_every: int      # a limit probe after every N measurements
    scale_s: float        # the 4x and 16x measurements


@dataclass(frozen=True)
class Callers:
    groups_per_request: int             # pattern (a): several groups per request
    several_groups: tuple[int, ...]     # pattern (a) concurrencies
    one_response: tuple[int, ...]       # pattern (b) and the naive server's concurrencies
    many: int                           # the "many concurrent callers" of the targets
    repeats: int                        # how many times the target comparisons are measured
                                        # (the ratio reported: the median run's)


@dataclass(frozen=True)
class VerifierPlan:
    scale: int                  # which workload the verifier pool measurement runs
    rounds: int
    chunk_sweep: tuple[int, ...]  # chunk sizes fed to a bare pool, as evidence


@dataclass(frozen=True)
class ForwardSweep:
    batch_sizes: tuple[int, ...]  # bare-forward batch sizes measured besides the limit
    rollouts: int
    rounds: int


@dataclass(frozen=True)
class CoreSplit:
    variants: tuple[str, ...]  # of "main", "workers_per_core", "fewer_threads"
    patterns: tuple[str, ...]  # which patterns ("a", "b") the variants run
    several_groups_callers: int  # callers of the variants' pattern (a); (b) uses Callers.many


@dataclass(frozen=True)
class OverloadPlan:
    burst_s: float
    max_queued_rollouts: int  # --max-queued-rollouts of the overload server
    idle_after_s: float       # watched after the burst, for the RSS it keeps


@dataclass(frozen=True)
class ModelShape:
    """A random Qwen2-shaped sequence classifier (``shared_prompt.build_model``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class SharedPromptPlan:
    model: ModelShape
    long_groups: int        # groups of the long-prompt workload (8 responses each)
    few_shot_tokens: int    # the few-shot block before each of its problems
    response_tokens: int    # each of its responses
    dev_groups: int         # groups of the dev data as is
    rounds: int             # every arm once per round, interleaved (ratios: median round)
    max_batch_tokens: int   # the service's token budget (its CPU default in the full plan)


@dataclass(frozen=True)
class Plan:
    name: str
    windows: Windows
    callers: Callers
    verifier: VerifierPlan
    forward_sweep: ForwardSweep
    core_split: CoreSplit
    overload: OverloadPlan
    shared_prompt: SharedPromptPlan
    max_batch_tokens: int  # 0: the service's own default for the device

    def with_token_budget(self, max_batch_tokens: int) -> Plan:
        return dataclasses.replace(self, max_batch_tokens=max_batch_tokens)


FULL = Plan(
    "full",
    Windows(measurement_s=8.0, probe_s=3.0, probe_every=1, scale_s=10.0),
    Callers(groups_per_request=4, several_groups=(1, 4, 16), one_response=(1, 4, 16), many=16,
            repeats=3),
    VerifierPlan(scale=4, rounds=3, chunk_sweep=(8, 32)),
    ForwardSweep(batch_sizes=(8, 32, 128), rollouts=128, rounds=1),
    CoreSplit(variants=("main", "workers_per_core", "fewer_threads"), patterns=("a", "b"),
              several_groups_callers=4),
    OverloadPlan(burst_s=10.0, max_queued_rollouts=64, idle_after_s=2.0),
    SharedPromptPlan(ModelShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768),
                     long_groups=4, few_shot_tokens=500, response_tokens=300, dev_groups=4,
                     rounds=3, max_batch_tokens=4096),
    max_batch_tokens=0)
# The smoke version: the same sections with tiny windows, 8 callers, a 2048-token budget,
# two core-split variants, a tiny shared-prompt model.
QUICK = Plan(
    "quick",
    Windows(measurement_s=1.5, probe_s=1.0, probe_every=5, scale_s=1.5),
    Callers(groups_per_request=1, several_groups=(1, 4, 8), one_response=(8,), many=8,
            repeats=1),
    VerifierPlan(scale=1, rounds=1, chunk_sweep=(32,)),
    ForwardSweep(batch_sizes=(8, 16), rollouts=16, rounds=1),
    CoreSplit(variants=("main", "fewer_threads"), patterns=("b",), several_groups_callers=4),
    OverloadPlan(burst_s=2.0, max_queued_rollouts=16, idle_after_s=1.0),
    SharedPromptPlan(ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
                     long_groups=2, few_shot_tokens=200, response_tokens=80, dev_groups=2,
                     rounds=1, max_batch_tokens=2048),
    max_batch_tokens=2048)
