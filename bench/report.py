"""The results of a run: the JSON (``results``), the targets with PASS/MISS, the table printed
to stdout and the plot."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any, Optional

import shared_prompt
from machine import (
    client_http_backend,
    cores,
    cpu_model,
    git_commit,
    gpu_name,
    torch_threads,
    torch_version,
)
from measurement import Measurement
from sections import Findings
from targets import AT_LEAST, BELOW, target, target_lines


def results(found: Findings) -> dict[str, Any]:
    """The run as ``latest.json`` keeps it (and as ``--render-only`` reads it back)."""
    plan, options = found.plan, found.options
    by_key = {m.key: m.as_json() for m in found.measurements}
    hero: dict[str, dict[str, Any]] = {
        "several_groups": {str(c): by_key[f"hero_a_c{c}"] for c in plan.callers.several_groups},
        "one_response": {str(c): by_key[f"hero_b_c{c}"] for c in plan.callers.one_response}}
    naive = {str(c): by_key[f"naive_c{c}"] for c in plan.callers.one_response}
    scale: dict[str, Any] = {"1x": by_key["hero_a_c4"], "4x": by_key["scale_4x"],
                             "16x": by_key["scale_16x"]}
    at_1x, at_16x = _find(found, "hero_a_c4"), _find(found, "scale_16x")
    assert at_1x and at_16x
    scale["ratio_16x_to_1x"] = round(at_16x.rate / at_1x.rate, 4)
    if at_1x.limit_ratio and at_16x.limit_ratio:
        scale["ratio_16x_to_1x_limit_normalised"] = round(
            at_16x.limit_ratio / at_1x.limit_ratio, 4)
    core_split = {}
    for variant in found.variants:
        entry: dict[str, Any] = {"verifier_workers": variant.verifier_workers,
                 "torch_threads": variant.torch_threads or torch_threads()}
        for pattern in found.core_split_patterns:
            entry[pattern] = by_key[f"split_{variant.name}_{pattern}"]
        core_split[variant.name] = entry
    return {
        "meta": {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": plan.name, "machine": cpu_model(), "cores": cores(),
            "gpu": gpu_name(), "python": platform.python_version(),
            "torch": torch_version(), "reward_model": options.reward_model,
            "device": options.device, "verifier_workers": options.verifier_workers,
            "max_batch_tokens": plan.max_batch_tokens,
            "groups_per_request": plan.callers.groups_per_request,
            "callers": plan.callers.many,
            "duration_s": round(found.duration_s, 1),
            "loadavg_1m_start": round(found.loadavg_start, 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "git_commit": git_commit(),
            "client_http_backend": client_http_backend(),
        },
        "workloads": {w.name: {"groups": w.n_groups, "group_size": w.group_size,
                               "rollouts": w.n_rollouts,
                               "duplicate_responses_in_file": w.file_duplicates}
                      for w in found.workloads.values()},
        "limit": found.limit,
        "hero_rewards": hero,
        "naive": naive,
        "trl_style": by_key["trl"],
        "verifier_pool": found.verifier,
        "scale": scale,
        "core_split": core_split,
        "overload": found.overload,
        "shared_prompt": found.shared_prompt,
        "targets": targets(found, scale),
    }


def _find(found: Findings, key: str) -> Optional[Measurement]:
    return next((m for m in found.measurements if m.key == key), None)


def _relative(x: Optional[Measurement], y: Optional[Measurement]) -> Optional[float]:
    """x over y, each first divided by the limit probed around it (drift-corrected)."""
    if x is None or y is None or not x.limit_ratio or not y.limit_ratio:
        return None
    return x.limit_ratio / y.limit_ratio


def targets(found: Findings, scale: dict[str, Any]) -> list[dict[str, Any]]:
    c = found.plan.callers.many
    several, one_response = _find(found, f"hero_a_c{c}"), _find(found, f"hero_b_c{c}")
    naive, trl, several_c4 = (_find(found, f"naive_c{c}"), _find(found, "trl"),
                              _find(found, "hero_a_c4"))
    verifier, over = found.verifier, found.overload
    return [
        target(f"hero-rewards several-group requests (C={c}) / limit",
               several.limit_ratio if several else None, 0.9, ">= 0.9"),
        target(f"hero-rewards {c} callers x 1 response / limit",
               one_response.limit_ratio if one_response else None, 0.9, ">= 0.9"),
        target(f"hero-rewards / naive server (both {c} callers x 1 response)",
               _relative(one_response, naive), 1.0, ">= 1"),
        target("hero-rewards (C=4, several groups) / TRL-style in-process",
               _relative(several_c4, trl), 1.0, ">= 1"),
        target("verifier pool / (single process x cores)",
               verifier["ratio_pool_to_single_x_cores"], 0.85, ">= 0.85"),
        # Lanes cost nothing at one worker per core, and pay where a group's responses have
        # more workers to scatter over.
        *([target("verifier, 1 response per call, 1 worker/core: lanes / one queue",
                  verifier["per_sample"]["ratio_lanes_to_one_queue"], 0.95, ">= 0.95"),
           target("verifier, 1 response per call, 2 workers/core: lanes / one queue",
                  verifier["per_sample_twice_the_workers"]["ratio_lanes_to_one_queue"], 1.2,
                  ">= 1.2")]
          if "per_sample_twice_the_workers" in verifier else []),
        target("scale: 16x / 1x rollouts/s (limit-normalised)",
               scale.get("ratio_16x_to_1x_limit_normalised", scale["ratio_16x_to_1x"]), 0.9,
               ">= 0.9"),
        target("overload: RSS peak in the burst over the at-capacity peak (MB)",
               over["rss_growth_over_capacity_peak_mb"], 100.0, "< 100 MB", BELOW),
        target("overload: RSS retained after the burst (MB)", over["rss_retained_mb"], 100.0,
               "< 100 MB", BELOW),
        target("overload: 429s that carry Retry-After (fraction)",
               (over["rejected_429_with_retry_after"] / over["rejected_429"])
               if over["rejected_429"] else None, 1.0, "== 1 (and some 429s)", AT_LEAST),
    ]


# ---------------------------------------------------------------------------------------------
# The table

def format_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


ROW_NAME_WIDTH = 58


def table(r: dict[str, Any]) -> str:
    """The table ``make bench`` prints: one row per measurement, then the verifier, overload,
    forward-sweep, scale and prompt-sharing lines, then the targets (prompt sharing's last)."""
    shared = r.get("shared_prompt")  # absent from results written before the section
    return "\n".join([*_heading(r["meta"]), *_measurement_rows(r), "",
                      *_host_cpu_lines(r), *_verifier_lines(r["verifier_pool"]),
                      *_overload_lines(r["overload"]),
                      *_sweep_and_scale_lines(r["limit"], r["scale"]),
                      *(shared_prompt.rows(shared, ROW_NAME_WIDTH) if shared else []), "",
                      *target_lines(r["targets"] + (shared["targets"] if shared else []),
                                    name_width=62, value_width=8)])


def _heading(meta: dict[str, Any]) -> list[str]:
    gpu = meta["gpu"] or "no GPU"
    title = (f"hero-rewards benchmark ({meta['mode']}) — {meta['date']} — {meta['machine']}, "
             f"{meta['cores']} cores, {gpu}; RM {meta['reward_model']} on {meta['device']}; "
             f"{meta['duration_s']:.0f} s; load avg {meta['loadavg_1m_start']}→"
             f"{meta['loadavg_1m_end']}")
    head = (f"{'measurement':<{ROW_NAME_WIDTH}} {'C':>3} {'rollouts/s':>11} {'x limit':>8}  "
            "notes")
    return [title, head, "-" * len(head)]


def _row(name: str, callers: Any, rate: Optional[float], ratio: Optional[float],
         notes: str = "") -> str:
    rate_s = "-" if rate is None else f"{rate:.1f}"
    return (f"{name:<{ROW_NAME_WIDTH}} {str(callers):>3} {rate_s:>11} "
            f"{format_ratio(ratio):>8}  {notes}")


def _measurement_row(name: str, callers: Any, x: dict[str, Any]) -> str:
    return _row(name, callers, x["rollouts_per_s"], x["ratio_to_limit"], _notes(x))


def _notes(x: dict[str, Any]) -> str:
    """What explains a measurement's rate: batch, RM busy, p99, cores used, verdicts, runs."""
    server = x.get("server", {})
    parts = []
    if server.get("mean_batch"):
        parts.append(f"batch {server['mean_batch']:.0f}")
    if "rm_busy_fraction" in server:
        parts.append(f"RM busy {server['rm_busy_fraction']:.0%}")
    if x.get("latency_p99_s") is not None:
        parts.append(f"p99 {x['latency_p99_s']:.2f}s")
    if "server_cpu_s" in server and x["elapsed_s"]:
        parts.append(f"cores srv {server['server_cpu_s'] / x['elapsed_s']:.1f} "
                     f"cli {server.get('client_cpu_s', 0.0) / x['elapsed_s']:.1f}")
    parts.append(f"correct {x['correct_fraction']:.2f}")
    if x.get("runs"):
        parts.append("runs x limit " + " / ".join(format_ratio(run["ratio_to_limit"])
                                                 for run in x["runs"]))
    if x.get("errors"):
        parts.append(f"ERRORS {x['errors']}")
    return ", ".join(parts)


def _measurement_rows(r: dict[str, Any]) -> list[str]:
    lim = r["limit"]
    rows = [_row("limit: bare forward, ideal sorted batches (median probe)", "-",
                 lim["rollouts_per_s"], 1.0,
                 f"{lim['probes']} probes {lim['min']:.1f}..{lim['max']:.1f}, batch "
                 f"{max(lim['batch_sizes'])}, {lim['tokens_per_rollout']:.0f} tok/rollout")]
    for pattern in ("several_groups", "one_response"):
        for c, x in r["hero_rewards"][pattern].items():
            rows.append(_measurement_row(f"hero-rewards: {x['pattern']}", c, x))
    for c, x in r["naive"].items():
        rows.append(_measurement_row(f"naive per-sample server: {x['pattern']}", c, x))
    rows.append(_measurement_row("TRL-style in-process: accuracy_reward + RM batches of 8", 1,
                                 r["trl_style"]))
    for key in ("1x", "4x", "16x"):
        x = r["scale"][key]
        rows.append(_measurement_row(f"scale {key}: {x['pattern']}", x["concurrency"], x))
    for entry in r["core_split"].values():
        for pattern in ("a", "b"):
            if pattern in entry:
                x = entry[pattern]
                rows.append(_measurement_row(
                    f"core split: verifier workers {entry['verifier_workers']}, torch threads "
                    f"{entry['torch_threads']} ({pattern})", x["concurrency"], x))
    return rows


def _host_cpu_lines(r: dict[str, Any]) -> list[str]:
    """Where a one-response request's CPU goes (issue 13's per-sample host cost): the
    service's event loop and verifier workers, the benchmark's own client on the same cores,
    and the threads that tokenize and run the forward (per rollout, the limit's work)."""
    backend = r["meta"].get("client_http_backend", "httpx")
    lines = [f"host CPU per request, 1 response per /get_reward (ms; client: AsyncHeroClient "
             f"on {backend}):"]
    for c, x in r["hero_rewards"]["one_response"].items():
        ms = x.get("cpu_ms_per_request")
        if not ms:
            continue
        host = ms["event_loop"] + ms["verifier_workers"]
        lines.append(f"  C={c}: event loop {ms['event_loop']:.2f} + verifier workers "
                     f"{ms['verifier_workers']:.2f} = host {host:.2f}; client "
                     f"{ms['client']:.2f}; tokenize + forward threads "
                     f"{ms['other_threads']:.1f}")
    return lines if len(lines) > 1 else []


def _verifier_lines(v: dict[str, Any]) -> list[str]:
    lines = [f"verifier ({v['workload']}, {v['responses']} responses × {v['rounds']} rounds): "
             f"one process {v['single_responses_per_s']:.0f}/s; service's MathVerifier, "
             f"{v['workers']} workers (chunks ≤ {v.get('service_max_chunk')}) "
             f"{v['pool_responses_per_s']:.0f}/s → pool / (single × {v['cores']}) = "
             f"{v['ratio_pool_to_single_x_cores']:.2f}; workers busy "
             f"{v['pool']['cores_busy']:.2f} of {v['cores']} cores, "
             f"{v['pool']['cpu_s_per_1k']:.2f} vs {v['single']['cpu_s_per_1k']:.2f} "
             f"CPU-s per 1k responses"]
    if "independent" in v:  # results written before the arm have none
        lines.append(f"  {v['cores']} independent processes (no pool, each its share "
                     f"sequentially): {v['independent']['responses_per_s']:.0f}/s → "
                     f"{v['ratio_independent_to_single_x_cores']:.2f} of single × {v['cores']}; "
                     f"pool / independent = {v['ratio_pool_to_independent']:.2f}")
    for size, x in v["sweep"].items():
        lines.append(f"  bare pool, chunks of {size}: {x['responses_per_s']:.0f}/s → "
                     f"{x['ratio_to_single_x_cores']:.2f} of single × {v['cores']}; workers busy "
                     f"{x['cores_busy']:.2f} cores")
    for key in ("per_sample", "per_sample_twice_the_workers"):
        if key not in v:
            continue
        p = v[key]
        lines.append(
            f"  one response per call ({p['callers']} callers, groups of 8, new references), "
            f"{p['workers']} workers: reference lanes {p['lanes']['responses_per_s']:.0f}/s "
            f"({p['lanes']['worker_cpu_ms_per_response']:.2f} worker CPU-ms/response), one "
            f"queue {p['one_queue']['responses_per_s']:.0f}/s "
            f"({p['one_queue']['worker_cpu_ms_per_response']:.2f}) → lanes / one queue = "
            f"{p['ratio_lanes_to_one_queue']:.2f}")
    return lines


def _overload_lines(o: dict[str, Any]) -> list[str]:
    cap = o["at_capacity"]
    return [f"overload ({o['factor']}x: {o['callers']} callers × {o['rollouts_per_request']} "
            f"rollouts vs --max-queued-rollouts {o['max_queued_rollouts']}, "
            f"{o['burst_s']:.0f} s): {o['rejected_429']} × 429 "
            f"({o['rejected_429_with_retry_after']} with Retry-After), "
            f"{o['accepted_requests']} accepted, {o['accepted_rollouts_per_s']:.1f} "
            f"rollouts/s, p50 {o['latency_p50_s']:.2f}s p99 {o['latency_p99_s']:.2f}s "
            f"(at capacity: {cap['rollouts_per_s']:.1f} rollouts/s, p99 "
            f"{cap['latency_p99_s']:.2f}s)",
            f"  RSS of the server tree: idle {o['rss_idle_before_mb']:.0f} MB, peak at "
            f"capacity {cap['rss_peak_mb']:.0f}, peak in the burst {o['rss_peak_mb']:.0f} "
            f"(+{o['rss_growth_over_capacity_peak_mb']:.0f}), idle after "
            f"{o['rss_idle_after_mb']:.0f} (retained {o['rss_retained_mb']:+.0f}); server "
            f"threads {o['server_threads_before']} → {o['server_threads_after']}"]


def _sweep_and_scale_lines(lim: dict[str, Any], scale: dict[str, Any]) -> list[str]:
    sweep = ", ".join(f"batch {b}: {v:.1f}" for b, v in lim["by_batch_size"].items())
    return [f"bare forward by batch size (rollouts/s, same texts): {sweep}",
            f"scale: 16x / 1x = {scale['ratio_16x_to_1x']:.2f} raw, "
            f"{scale.get('ratio_16x_to_1x_limit_normalised', float('nan')):.2f} "
            "limit-normalised"]


# ---------------------------------------------------------------------------------------------
# The plot


def plot(r: dict[str, Any], path: Path) -> None:
    """Left: rollouts/s against concurrent callers (the limit dashed, its probes' range shaded).
    Right: the same measurements over the limit probed around each (drift-corrected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    lim = r["limit"]
    for ax, key, ylabel in ((axes[0], "rollouts_per_s", "rollouts / s"),
                            (axes[1], "ratio_to_limit", "× limit (probed around each run)")):
        for label, series, marker in (
            ("hero-rewards: several groups / request", r["hero_rewards"]["several_groups"], "o"),
            ("hero-rewards: 1 response / request", r["hero_rewards"]["one_response"], "s"),
            ("naive per-sample server", r["naive"], "^"),
        ):
            cs = sorted(int(c) for c in series)
            ax.plot(cs, [series[str(c)][key] or 0.0 for c in cs], marker=marker, label=label)
        trl = r["trl_style"]
        ax.scatter([1], [trl[key] or 0.0], marker="D", color="k", zorder=5,
                   label="TRL-style in-process (sequential)")
        if key == "rollouts_per_s":
            ax.axhline(lim["rollouts_per_s"], color="gray", linestyle="--",
                       label=f"limit: bare forward (median of {lim['probes']} probes)")
            ax.axhspan(lim["min"], lim["max"], color="gray", alpha=0.12)
        else:
            ax.axhline(1.0, color="gray", linestyle="--", label="limit")
            ax.axhline(0.9, color="gray", linestyle=":", label="target 0.9 × limit")
        colours = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
        for name, entry in r["core_split"].items():
            colour = next(colours, "k")
            for pattern, marker in (("a", "x"), ("b", "+")):
                if pattern in entry:
                    x = entry[pattern]
                    kind = "several groups" if pattern == "a" else "1 response"
                    ax.scatter([x["concurrency"]], [x[key] or 0.0], marker=marker, s=60,
                               color=colour, zorder=5, label=f"core split {name} ({kind})")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16])
        ax.set_xticklabels(["1", "4", "16"])
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    m = r["meta"]
    fig.suptitle(f"hero-rewards benchmark ({m['mode']}, {m['date']}): {m['machine']}, "
                 f"{m['cores']} cores, {m['gpu'] or 'no GPU'}; RM {m['reward_model']} on "
                 f"{m['device']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

