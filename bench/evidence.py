#!/usr/bin/env python
"""Micro-measurements behind the service performance notes in bench/README.md ("Findings").
Each compares the service's code path with a variant side by side, in this process, on the dev
data; nothing here changes the service.

    .venv/bin/python bench/evidence.py        # ~1 minute on 2 CPU cores

1. Embedded RM: references padded into the response batch vs embedded in their own batch.
2. Pipeline: the per-group owner loop of ``Pipeline._reward_model_scores`` vs one pass.
3. What other work on the same cores costs the RM forward: the bare forward alone vs while
   another process takes 5 % of the cores in bursts of 0.2 to 50 ms.
(The verifier chunk size is measured by run.py itself: the "verifier" lines.)"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import Workload, load_rows


def reference_padding(rounds: int = 3) -> None:
    import torch

    from hero_service.reward_models import ScoringItem, load_reward_model

    model = load_reward_model("embedded", device="cpu")
    groups = Workload(load_rows(), 1).groups(0)
    encoded = model.encode([ScoringItem(g.prompt, r, g.reference)
                            for g in groups for r in g.responses])

    def separate(batch):  # responses in one batch, the distinct references in a short one
        responses = model._embed([e.payload[0] for e in batch])
        refs = list(dict.fromkeys(e.payload[1] for e in batch))
        vectors = model._embed(refs)
        row = {r: i for i, r in enumerate(refs)}
        return (responses * vectors[[row[e.payload[1]] for e in batch]]).sum(-1)

    print("1. EmbeddedRewardModel.forward: references (3-11 tokens here) are padded to the "
          "responses' width (128) in the same batch")
    model.forward(encoded[:8])
    for size, n in ((1, 32), (8, 96), (128, 256)):
        current, fixed = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            for i in range(0, n, size):
                model.forward(encoded[i % 384:i % 384 + size])
            current.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in range(0, n, size):
                separate(encoded[i % 384:i % 384 + size])
            fixed.append(n / (time.perf_counter() - t))
        c, f = statistics.median(current), statistics.median(fixed)
        print(f"   batch {size:>3}: current {c:6.1f} rollouts/s, references separately "
              f"{f:6.1f} rollouts/s ({f / c - 1:+.0%})")
    batch = encoded[:128]
    diff = (torch.tensor(model.forward(batch)) - separate(batch)).abs().max()
    print(f"   same scores: max |difference| = {float(diff):.1e}")


def owner_loop() -> None:
    print("2. Pipeline._reward_model_scores: `for g in owners: [i for i, o in enumerate(owners) "
          "if o == g]` is O(groups x rollouts) on the event loop")
    for n_groups in (64, 256, 1024):
        owners = [g for g in range(n_groups) for _ in range(8)]
        t = time.perf_counter()
        for g in dict.fromkeys(owners):
            _ = [i for i, owner in enumerate(owners) if owner == g]
        quadratic = time.perf_counter() - t
        t = time.perf_counter()
        by_group: dict[int, list[int]] = {}
        for i, owner in enumerate(owners):
            by_group.setdefault(owner, []).append(i)
        linear = time.perf_counter() - t
        print(f"   {n_groups:>4} groups x 8: {quadratic * 1000:7.1f} ms (one pass: "
              f"{linear * 1000:.2f} ms)")


def _burn(period_s: float, burst_s: float, stop: Any) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < burst_s:
            pass
        time.sleep(period_s - burst_s)


def interference(rounds: int = 3, probe_s: float = 3.0, share: float = 0.05) -> None:
    """The forward's torch threads (one per core) meet at a barrier after every operator: a
    thread that loses its core stalls the others, so work beside the forward costs it more
    than its own CPU. The service's host work (HTTP, validation, verifier workers, tokenizing,
    and the benchmark's client) runs beside it on the same cores; the limit runs alone."""
    import multiprocessing

    from limit import BareForwardLimit
    from machine import cores

    from hero_service.reward_models import load_reward_model

    model = load_reward_model("embedded", device="cpu")
    limit = BareForwardLimit(model, Workload(load_rows(), 1), 4096)
    limit.warm_up()
    fork = multiprocessing.get_context("fork")  # the child only spins: nothing of torch's runs
    bursts_ms = (0.0, 0.2, 1.0, 5.0, 50.0)
    rates: dict[float, list[float]] = {b: [] for b in bursts_ms}
    for _ in range(rounds):
        for burst_ms in bursts_ms:
            stop, side = fork.Event(), None
            if burst_ms:
                # One process at `share` of all cores: bursts of burst_ms, `share * cores`
                # of each period.
                period_s = burst_ms / 1000 / (share * cores())
                side = fork.Process(target=_burn, args=(period_s, burst_ms / 1000, stop))
                side.start()
            rates[burst_ms].append(limit.probe(probe_s))
            if side is not None:
                stop.set()
                side.join()
    alone = statistics.median(rates[0.0])
    print(f"3. The bare forward (embedded RM, batches of 32, {cores()} torch threads) alone: "
          f"{alone:.1f} rollouts/s; with another process at {share:.0%} of the {cores()} cores "
          f"(median of {rounds} rounds):")
    for burst_ms in bursts_ms[1:]:
        rate = statistics.median(rates[burst_ms])
        slowdown = 1 - rate / alone
        print(f"   bursts of {burst_ms:>4g} ms: {rate:6.1f} rollouts/s, {-slowdown:+6.1%} "
              f"-> {slowdown / share:.1f}x the other process's share")


if __name__ == "__main__":
    reference_padding()
    owner_loop()
    interference()
