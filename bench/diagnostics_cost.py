"""What the reward diagnostics cost (issue 14): grouped /v1/rewards throughput with the
diagnostics as shipped against the same service with them stubbed out, side by side in one
process, rounds interleaved.

The service has no switch for the flags and their metrics (they are always on; only the audit log
is optional), so "off" replaces ``diagnostics.disagreements`` and ``Metrics.observe_group`` with
no-ops and drops the audit log: the ratio is the whole cost of the code. Requests go through the
real app (every middleware, the embedded RM, the math-verify pool) over httpx's ASGI transport;
throughput is rollouts per CPU-second of this process and its verifier workers, which the load of
other jobs on a shared machine moves less than wall time. The workload is the dev data with the
planted verifier misses of the acceptance test (each all-correct group's best-scored response
rewritten to a wrong answer), so flags, metrics and audit lines are really produced.

    .venv/bin/python bench/diagnostics_cost.py [--rounds 6] [--no-rm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from hero_client import diagnostics
from hero_service.app import create_app
from hero_service.config import Settings
from hero_service.metrics import Metrics

DATA = Path(os.environ.get("HERO_DEV_DATA", Path(__file__).resolve().parents[2] / "shared"
                           / "data" / "math-rollouts-dev.jsonl"))
BOXED = "\\boxed{"
PLANTED_ANSWER = "-987654321"  # nothing in MATH's dev answers equals this
TARGET = 0.97


def rewrite_boxed(text: str, answer: str) -> str:
    """Every ``\\boxed{...}`` of ``text`` (nested braces included) with ``answer`` inside."""
    out, at = [], 0
    while (start := text.find(BOXED, at)) >= 0:
        end, depth = start + len(BOXED), 1
        while depth and end < len(text):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        out += [text[at:start], BOXED, answer, "}"]
        at = end
    return "".join(out + [text[at:]])


def planted_groups(with_rm_scores: bool) -> list[dict[str, Any]]:
    groups = []
    for line in DATA.read_text().splitlines():
        row = json.loads(line)
        responses, scores = list(row["responses"]), row["rm72b_scores"]
        if all(row["grader_correct"]):
            best = max(range(len(scores)), key=scores.__getitem__)
            responses[best] = rewrite_boxed(responses[best], PLANTED_ANSWER)
        group = {"id": row["id"], "reference": row["reference"], "responses": responses,
                 "prompt": row["prompt"]}
        if with_rm_scores:
            group["rm_scores"] = scores
        groups.append(group)
    return groups


class Switch:
    """Diagnostics as shipped (on) or replaced by no-ops (off)."""

    def __init__(self) -> None:
        self.flags: Callable[..., Any] = diagnostics.disagreements
        self.observe: Callable[..., Any] = Metrics.observe_group

    def set(self, on: bool) -> None:
        diagnostics.disagreements = self.flags if on else (lambda *_a, **_k: None)  # type: ignore[assignment]
        Metrics.observe_group = self.observe if on else (lambda *_a, **_k: None)  # type: ignore[method-assign]


def cpu_seconds() -> float:
    me = psutil.Process()
    total = me.cpu_times().user + me.cpu_times().system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def measure(rounds: int, requests: int, with_rm_scores: bool) -> dict[str, Any]:
    groups = planted_groups(with_rm_scores)
    rollouts = sum(len(g["responses"]) for g in groups) * requests
    audit_path = Path(tempfile.mkdtemp()) / "flagged.jsonl"
    switch = Switch()
    rates: dict[bool, list[float]] = {True: [], False: []}
    app = create_app(Settings(verifier_workers=1, audit_log=audit_path))
    async with app.router.lifespan_context(app):
        pipeline = app.state.service.runtime.pipeline
        audit = pipeline.audit
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                     timeout=600) as client:
            async def send() -> None:
                answer = await client.post("/v1/rewards", json={"groups": groups})
                answer.raise_for_status()

            await send()  # warm-up: first parses, the reference caches
            for r in range(rounds):
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    switch.set(on)
                    pipeline.audit = audit if on else None
                    started = cpu_seconds()
                    for _ in range(requests):
                        await send()
                    rates[on].append(rollouts / (cpu_seconds() - started))
    switch.set(True)
    time.sleep(0.5)  # the audit writer thread flushes
    paired = [a / b for a, b in zip(rates[True], rates[False])]
    return {"rounds": rounds, "requests_per_round": requests, "rollouts_per_round": rollouts,
            "rm": "rm_scores sent" if with_rm_scores else "embedded MiniLM",
            "on_per_cpu_s": [round(x, 1) for x in rates[True]],
            "off_per_cpu_s": [round(x, 1) for x in rates[False]],
            "ratio_paired_median": round(statistics.median(paired), 3),
            "ratio_of_medians": round(statistics.median(rates[True])
                                      / statistics.median(rates[False]), 3),
            "audit_lines": sum(1 for _ in audit_path.open()) if audit_path.exists() else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-rm", action="store_true",
                        help="send the 72B scores (no RM forward): the pipeline's own cost only")
    args = parser.parse_args()
    result = asyncio.run(measure(args.rounds, 3 if args.no_rm else 1, args.no_rm))
    print(json.dumps(result, indent=1))
    verdict = "PASS" if result["ratio_paired_median"] >= TARGET else "MISS"
    print(f"{verdict}  diagnostics on / off, grouped /v1/rewards ({result['rm']}): "
          f"{result['ratio_paired_median']:.3f}  (>= {TARGET})")


if __name__ == "__main__":
    main()
