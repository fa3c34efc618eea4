"""What the client costs its caller: CPU per ``/get_reward`` request of ``AsyncHeroClient`` on
its two HTTP backends (httpx's pool, aiohttp's through httpx-aiohttp), with C callers each
sending one response per request (OpenRLHF's and verl's per-sample pattern), against one real
service on 127.0.0.1. Arms interleaved round by round; the figure is the CPU time of this
process (the client alone: the service is another process) per answered request, the median of
rounds, and httpx over aiohttp for the same C.

    .venv/bin/python bench/client_cost.py [--quick] [--rounds 3] [--callers 16 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from itertools import count
from pathlib import Path
from typing import Any

from machine import progress_log
from procs import hero_server
from workload import Workload, load_rows

from hero_client import AsyncHeroClient

log = progress_log("client-cost")
BACKENDS = ("httpx", "aiohttp")


async def one_arm(url: str, backend: str, callers: int, window_s: float,
                  queries: list[tuple[str, str, str]], tags: count) -> dict[str, float]:
    """``callers`` closed-loop callers for ``window_s``: requests answered and this process's
    CPU-ms per request (the client's connections made before the clock starts)."""
    async with AsyncHeroClient(url, http_backend=backend, max_connections=None,
                               timeout=600) as client:
        async def send() -> None:
            k = next(tags)
            prompt, response, reference = queries[k % len(queries)]
            tagged = f"(call {k}) {response}"
            await client.get_reward([prompt + tagged], prompts=[prompt], labels=[reference])

        await asyncio.gather(*(send() for _ in range(callers)))  # open the connections
        answered = 0
        deadline = time.perf_counter() + window_s

        async def caller() -> None:
            nonlocal answered
            while time.perf_counter() < deadline:
                await send()
                answered += 1

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"requests": answered, "requests_per_s": answered / wall,
            "client_cpu_ms_per_request": 1000 * cpu / answered if answered else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s windows, C = 16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--results-dir", type=Path,
                        default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    rounds, callers, window = ((1, [16], 2.0) if args.quick
                               else (args.rounds, args.callers, args.window_s))
    queries = [(g.prompt, r, g.reference) for g in Workload(load_rows(), 1).groups(0)
               for r in g.responses]
    server = hero_server("client-cost", args.results_dir / "logs", reward_model="embedded",
                         device="cpu", verifier_workers=1, max_batch_tokens=0)
    server.start()
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        str(c): {b: [] for b in BACKENDS} for c in callers}
    try:
        server.wait_ready()
        tags = count()
        for r in range(rounds):
            for c in callers:
                order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
                for backend in order:
                    arm = asyncio.run(one_arm(server.url, backend, c, window, queries, tags))
                    results[str(c)][backend].append(arm)
                    log(f"round {r} C={c} {backend}: {arm['requests']} requests, "
                        f"{arm['client_cpu_ms_per_request']:.2f} ms CPU each")
    finally:
        server.stop()
    lines = ["client CPU per /get_reward request (AsyncHeroClient, this process only; median "
             f"of {rounds} round(s), {window:.0f} s windows, one real service on 127.0.0.1):"]
    summary: dict[str, Any] = {}
    for c in callers:
        ms = {b: statistics.median(a["client_cpu_ms_per_request"] for a in results[str(c)][b])
              for b in BACKENDS}
        summary[str(c)] = {"client_cpu_ms_per_request": ms,
                           "httpx_over_aiohttp": ms["httpx"] / ms["aiohttp"]}
        lines.append(f"  C={c:<4} httpx {ms['httpx']:.2f} ms, aiohttp {ms['aiohttp']:.2f} ms "
                     f"-> httpx / aiohttp {ms['httpx'] / ms['aiohttp']:.2f}x")
    text = "\n".join(lines)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "client_cost.txt").write_text(text + "\n")
    (args.results_dir / "client_cost.json").write_text(json.dumps(
        {"rounds": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
