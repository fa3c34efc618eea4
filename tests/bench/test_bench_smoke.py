"""Smoke test of the benchmark: ``bench/run.py --quick`` end to end (real service processes, the
naive server, the TRL-style path, the verifier pool, the overload burst) into a temporary
directory; every section of the JSON must be there with positive numbers."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

SECTIONS = ("meta", "workloads", "limit", "hero_rewards", "naive", "trl_style", "verifier_pool",
            "scale", "core_split", "overload", "targets")


def _arm_ok(name: str, arm: dict) -> None:
    assert arm["rollouts_per_s"] > 0, name
    assert arm["rollouts"] > 0 and arm["requests"] > 0, name
    assert arm["errors"] == 0, name
    assert arm["ratio_to_limit"] is not None and arm["ratio_to_limit"] > 0, name
    assert arm["latency_p99_s"] > 0, name
    # Every path really verifies: the dev data is mostly correct answers.
    assert arm["correct_fraction"] > 0.5, name
    # The derived workloads must not collapse under the service's dedupe.
    assert arm["server"].get("deduplicated_rollouts", 0) == 0, name


def test_bench_quick_writes_every_section(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--results-dir",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    for section in SECTIONS:
        assert section in result, section
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert "targets:" in proc.stdout and "hero-rewards" in proc.stdout
    # The table is a function of the JSON alone: --render-only redraws the same one.
    rendered = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--render-only", "--results-dir",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert rendered.stdout == (tmp_path / "latest.txt").read_text()
    assert rendered.stdout.strip() in proc.stdout

    limit = result["limit"]
    assert limit["rollouts_per_s"] > 0 and limit["probes"] >= 2
    assert all(v > 0 for v in limit["by_batch_size"].values())
    for c, arm in result["hero_rewards"]["several_groups"].items():
        _arm_ok(f"hero a C={c}", arm)
        assert arm["server"]["mean_batch"] > 0 and arm["server"]["rm_busy_fraction"] > 0
    for c, arm in result["hero_rewards"]["one_response"].items():
        _arm_ok(f"hero b C={c}", arm)
    for c, arm in result["naive"].items():
        _arm_ok(f"naive C={c}", arm)
    _arm_ok("trl", result["trl_style"])
    for key in ("1x", "4x", "16x"):
        _arm_ok(f"scale {key}", result["scale"][key])
    assert result["scale"]["ratio_16x_to_1x"] > 0
    assert result["core_split"], "no core-split variants measured"
    for name, entry in result["core_split"].items():
        assert entry["verifier_workers"] >= 1 and entry["torch_threads"] >= 1
        for pattern in ("a", "b"):
            if pattern in entry:
                _arm_ok(f"split {name} {pattern}", entry[pattern])

    v = result["verifier_pool"]
    assert v["single_responses_per_s"] > 0 and v["pool_responses_per_s"] > 0
    assert v["ratio_pool_to_single_x_cores"] > 0 and v["correct_fraction"] > 0.5
    # the machine's ceiling: independent processes, no pool
    assert v["independent"]["responses_per_s"] > 0 and v["ratio_pool_to_independent"] > 0

    o = result["overload"]
    assert o["rejected_429"] > 0, "a 10x burst must be refused in part"
    assert o["rejected_429_with_retry_after"] == o["rejected_429"]
    assert o["accepted_requests"] > 0 and o["latency_p99_s"] > 0
    assert o["rss_idle_before_mb"] > 0 and o["rss_peak_mb"] > 0
    assert o["at_capacity"]["requests"] > 0 and o["at_capacity"]["rss_peak_mb"] > 0
    assert o["other_errors"] == 0

    assert len(result["targets"]) == 11
    assert all(t["measured"] is not None for t in result["targets"])
    # The servers the benchmark started are gone: nothing answers on their ports.
    ready = [line for line in proc.stderr.splitlines() if "servers ready" in line]
    assert ready, proc.stderr[-2000:]
    ports = [int(p) for p in re.findall(r"@(\d+)", ready[0])]
    assert len(ports) >= 3
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"
    print(f"bench --quick took {elapsed:.0f}s")


def run_quick(script: str, results: Path, *,
              timeout_s: int) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``bench/<script>.py --quick`` writing into ``results``: it must exit 0 and print the
    table it saved; returns the process and the JSON it wrote."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick", "--results-dir",
         str(results)], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (results / f"{script}.txt").read_text().strip() in proc.stdout
    return proc, json.loads((results / f"{script}.json").read_text())


def test_group_store_bench_quick(tmp_path: Path) -> None:
    """``bench/group_store.py --quick``: a real redis-server and two services (memory / Redis
    group store), both patterns measured on both, every group checked, every process gone."""
    proc, result = run_quick("group_store", tmp_path, timeout_s=300)
    groups_per_round = result["meta"]["plan"]["groups"]

    checked = 0
    for pattern in ("per_sample", "pieces"):
        section = result[pattern]
        assert section is not None, pattern
        for store in ("memory", "redis"):
            x = section["stores"][store]
            assert x["rounds"] and x["errors"] == 0, (pattern, store)
            assert all(r["rollouts"] == 8 * groups_per_round for r in x["rounds"])
            assert x["rollouts_per_s"] > 0 and x["latency_p99_s"] > 0
            # Every rollout joins its group once, through either store.
            assert x["round_trips_per_rollout_by_op"]["join"] == 1.0, (pattern, store)
            assert x["deduplicated_rollouts"] == 0
            checked += len(x["rounds"]) * groups_per_round
        assert section["ratio_redis_to_memory"] > 0 and section["ratio_cpu_equivalent"] > 0
        assert len(section["ratio_per_round"]) == len(section["stores"]["redis"]["rounds"])
        # The kernel counts a process's CPU in 10 ms ticks: the redis-server of a quick run may
        # not reach one (the full run's does), so the quick check is that it was measured.
        assert section["stores"]["redis"]["redis_server_cpu_ms_per_rollout"] >= 0

    c = result["correctness"]
    assert c["ok"], c["examples"]
    assert c["groups_checked"] == checked and c["failed_requests"] == 0
    assert c["rollouts_compared"] == 8 * checked // 2
    assert c["max_reward_diff_same_sigma_ref"] <= 1e-4
    assert all(v for v in result["running_sigma_ref"].values())
    assert [t["measured"] is not None for t in result["targets"]] == [True] * 3
    assert "targets:" in proc.stdout and "redis / memory" in proc.stdout

    ready = [line for line in proc.stderr.splitlines() if "servers ready" in line]
    assert ready, proc.stderr[-2000:]
    ports = [int(p) for p in re.findall(r"@(\d+)", ready[0])]
    assert len(ports) == 3  # memory, redis services and the redis-server
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"


def test_shared_prompt_bench_quick(tmp_path: Path) -> None:
    """``bench/shared_prompt.py --quick``: its random Qwen2-shaped RM built and loaded with and
    without prompt sharing; every arm scores every rollout as the reference does, and sharing
    computes fewer tokens than the unshared forward on the same texts."""
    proc, result = run_quick("shared_prompt", tmp_path, timeout_s=240)
    assert set(result["long"]["arms"]) == {"bare", "service_sharing", "service_unshared"}
    assert set(result["dev"]["arms"]) == {"service_sharing", "service_unshared"}
    for name in ("long", "dev"):
        x = result[name]
        workload = x["workload"]
        assert workload["rollouts"] == 8 * workload["groups"] > 0
        assert workload["shared_fraction"] > 0.9 and workload["prompt_tokens"] > 0
        for arm, a in x["arms"].items():
            assert a["rollouts_per_s"] > 0 and a["forwards"] > 0, (name, arm)
            assert a["max_abs_score_diff"] <= 1e-3, (name, arm)
        arms = x["arms"]
        assert arms["service_sharing"]["computed_tokens"] < \
            arms["service_unshared"]["computed_tokens"], name
    # The long prompts are what sharing is for: far fewer tokens than the bare forward's.
    long = result["long"]["arms"]
    assert long["service_sharing"]["computed_tokens"] < 0.5 * long["bare"]["computed_tokens"]
    assert [t["measured"] is not None for t in result["targets"]] == [True] * 3
    assert result["targets"][2]["pass"], result["targets"][2]  # scores within 1e-3


def test_client_cost_bench_quick(tmp_path: Path) -> None:
    """``bench/client_cost.py --quick``: the client's CPU per request on both HTTP backends
    against a real service, and the service gone afterwards."""
    proc, result = run_quick("client_cost", tmp_path, timeout_s=240)
    for backend in ("httpx", "aiohttp"):
        (arm,) = result["rounds"]["16"][backend]
        assert arm["requests"] > 0 and arm["client_cpu_ms_per_request"] > 0, backend
    assert result["summary"]["16"]["httpx_over_aiohttp"] > 0
    assert "httpx / aiohttp" in proc.stdout
