#!/usr/bin/env python
"""Micro-measurements behind the service performance notes in bench/README.md ("Findings").
Each compares the service's code path with a variant side by side, in this process, on the dev
data; nothing here changes the service.

    .venv/bin/python bench/evidence.py        # ~1 minute on 2 CPU cores

1. Embedded RM: references padded into the response batch vs embedded in their own batch.
2. Pipeline: the per-group owner loop of ``Pipeline._reward_model_scores`` vs one pass.
(The verifier chunk size is measured by run.py itself: the "verifier" lines.)"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

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


if __name__ == "__main__":
    reference_padding()
    owner_loop()
