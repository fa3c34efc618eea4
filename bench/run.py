#!/usr/bin/env python
"""hero-rewards benchmark: one command, one run, every figure a ratio measured side by side.

    .venv/bin/python bench/run.py            # full run (< 10 min on a 2-core CPU)
    .venv/bin/python bench/run.py --quick    # ~1-minute smoke version

On workloads derived from the real dev rollouts (``workload.py``), it measures, in this order
(``sections.py``):

* verifier     ``MathVerifier`` pool (one worker per core) vs ``verify_chunk`` in one process
               (``verifier_pool.py``).
* limit        bare RM forward on the same texts in the service's own batches, probed between
               every two measurements so each is compared with the limit right before and after
               it (``limit.py``).
* the arms     hero-rewards over HTTP, (a) several groups per request and (b) one response per
               ``/get_reward``; the naive per-sample server; TRL-style in-process
               (``arms.py``).
* scale        (a) at 1x, 4x and 16x workloads.
* core split   verifier workers vs torch intra-op threads on this machine's cores.
* overload     a 10x burst against a small ``--max-queued-rollouts``: 429s and their
               Retry-After, p99 latency of accepted requests, RSS of the server tree
               (``overload.py``).
* sharing      a group's prompt encoded once: long shared prompts, the service against the bare
               per-text forward; the dev data as is, sharing on against off; a random
               Qwen2-shaped RM of its own on CPU (``shared_prompt.py``, also runnable alone).

Prints a table with PASS/MISS per target, writes ``bench/results/latest.json`` and
``bench/results/throughput.png`` (``report.py``). Every server runs on 127.0.0.1 in its own
session and is stopped at the end, also on error or Ctrl-C (``procs.py``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import report  # noqa: E402
from machine import progress_log  # noqa: E402
from plan import FULL, QUICK, Plan  # noqa: E402
from procs import stop_on_sigterm  # noqa: E402
from sections import BenchRun, Options  # noqa: E402

log = progress_log("bench")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="hero-rewards benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke version")
    parser.add_argument("--reward-model", default="embedded",
                        help="embedded (default) or hf:PATH — used by every path measured")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    parser.add_argument("--verifier-workers", type=int, default=1,
                        help="verifier processes of the main service (default 1)")
    parser.add_argument("--max-batch-tokens", type=int, default=0,
                        help="service token budget (default: the service's own for the device "
                             "— 4096 on CPU, 16384 on GPU; 2048 with --quick)")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the core-split variants (two fewer servers)")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--budget-s", type=float, default=660.0,
                        help="soft time bound: past 60%% of it the core split is cut to one "
                             "pattern (default 660)")
    parser.add_argument("--data", default=None, help="rollouts JSONL (default: the dev data)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: redraw the table and plot from "
                             "RESULTS_DIR/latest.json")
    return parser.parse_args(argv)


def plan_for(args: argparse.Namespace) -> Plan:
    """The plan, its token budget resolved: the option, the plan's own, else the service's
    default for the device."""
    from hero_service.config import Settings

    plan = QUICK if args.quick else FULL
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    return plan.with_token_budget(args.max_batch_tokens or plan.max_batch_tokens
                                  or Settings().resolved_max_batch_tokens(device))


def options_from(args: argparse.Namespace) -> Options:
    return Options(reward_model=args.reward_model, device=args.device,
                   verifier_workers=args.verifier_workers, core_split=not args.no_variants,
                   budget_s=args.budget_s, results_dir=Path(args.results_dir),
                   data=Path(args.data) if args.data else None)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.results_dir)
    if args.render_only:
        result = json.loads((out_dir / "latest.json").read_text())
        print(report.table(result))
        report.plot(result, out_dir / "throughput.png")
        return 0

    bench = BenchRun(options_from(args), plan_for(args))
    stop_on_sigterm()
    try:
        result = report.results(asyncio.run(bench.run()))
    finally:
        bench.stop_servers()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report.table(result)
    (out_dir / "latest.txt").write_text(text + "\n")
    report.plot(result, out_dir / "throughput.png")
    print(text)
    log(f"wrote {out_dir / 'latest.json'}, {out_dir / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
