"""The limit every measurement is compared with: the bare RM forward on the same texts —
pre-tokenized with the backend's ``encode``, length-sorted batches packed by the service's own
rule within its token budget, ``forward`` called directly (no HTTP, no verifier). Probed between
measurements, so each one is compared with the limit measured right before and after it."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from workload import Workload


class BareForwardLimit:
    def __init__(self, model: Any, workload: Workload, max_batch_tokens: int) -> None:
        from hero_service.batching import pack_batches
        from hero_service.reward_models import ScoringItem

        self.model = model
        items = [ScoringItem(g.prompt, r, g.reference)
                 for g in workload.groups(0) for r in g.responses]
        encoded = model.encode(items)
        self.n_tokens = [e.n_tokens for e in encoded]
        # The batcher's packing rule, with what this backend declares about its batches.
        self.batches = pack_batches(encoded, max_batch_tokens, padded=model.padded,
                                    max_batch_size=model.max_batch_size)
        self.probes: list[dict[str, float]] = []
        self._next_batch = 0

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({len(b) for b in self.batches})

    def warm_up(self) -> None:
        self.model.forward(self.batches[0][:8])

    def sweep(self, sizes: tuple[int, ...], n_rollouts: int, rounds: int = 2) -> dict[str, float]:
        """Bare forward at fixed batch sizes (interleaved, ``rounds`` times): where this
        device's per-rollout cost is lowest, which the token budget decides."""
        flat = [e for b in self.batches for e in b][:n_rollouts]
        rates: dict[int, list[float]] = {s: [] for s in sizes}
        for _ in range(rounds):
            for size in sizes:
                t0 = time.perf_counter()
                for i in range(0, len(flat), size):
                    self.model.forward(flat[i:i + size])
                rates[size].append(len(flat) / (time.perf_counter() - t0))
        return {str(s): round(statistics.mean(v), 3) for s, v in rates.items()}

    def probe(self, min_s: float) -> float:
        """Forward the batches in turn for at least ``min_s``; records and returns rollouts/s."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        n = 0
        while True:
            batch = self.batches[self._next_batch % len(self.batches)]
            self._next_batch += 1
            self.model.forward(batch)
            n += len(batch)
            if time.perf_counter() - t0 >= min_s:
                break
        t1 = time.perf_counter()
        rate = n / (t1 - t0)
        self.probes.append({"t": (t0 + t1) / 2, "t_start": t0, "t_end": t1,
                            "rollouts_per_s": rate, "rollouts": n,
                            "cpu_s": time.process_time() - cpu0,
                            "loadavg_1m": os.getloadavg()[0]})
        return rate

    def summary(self, max_batch_tokens: int, by_batch_size: dict[str, float]) -> dict[str, Any]:
        """The results' ``limit`` section: the median probe and its spread."""
        rates = [pr["rollouts_per_s"] for pr in self.probes]
        return {
            "rollouts_per_s": round(statistics.median(rates), 3),
            "min": round(min(rates), 3), "max": round(max(rates), 3),
            "probes": len(self.probes), "max_batch_tokens": max_batch_tokens,
            "batch_sizes": self.batch_sizes,
            "tokens_per_rollout": round(statistics.mean(self.n_tokens), 1),
            "by_batch_size": by_batch_size,
            "rollouts_per_cpu_s": round(sum(pr["rollouts"] for pr in self.probes)
                                        / sum(pr["cpu_s"] for pr in self.probes), 3),
            "probe_runs": [{"rollouts_per_s": round(pr["rollouts_per_s"], 3),
                            "loadavg_1m": round(pr["loadavg_1m"], 2)} for pr in self.probes],
        }
