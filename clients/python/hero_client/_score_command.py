"""``hero-rewards score``: score a JSONL file of prompt groups against a running service.

Each input line is one group::

    {"id": "q-17", "prompt": "What is 2+2?" | [{"role": ..., "content": ...}, ...],
     "reference": "4", "responses": ["...", ...], "rm_scores": [...]}   # rm_scores optional

The dev-data layout (``/work/shared/data/math-rollouts-dev.jsonl``) is accepted as is: a
``system`` field turns a string prompt into the chat ``[system, user]``, and
``--use-rm-scores rm72b_scores`` takes the RM scores from that field (no RM call).

Each output line is the group's result (the ``GroupResult`` fields of the wire contract, ``id``
first) plus ``sigma_ref`` (the sigma-bar the batch was weighted with) and ``batch`` (the batch
number). Groups are sent ``--batch-groups`` at a time, in file order, one batch after the other:
the client keeps the running sigma-bar (``RunningSigma``) and sends it with each batch, so the
result is the one a training run that saw these batches would get.

The run is resumable: groups whose id already appears in the output are skipped, new results are
appended, and the running sigma-bar is rebuilt from the output (the last batch's ``sigma_ref``
and group sigmas). A truncated last line (the process was killed mid-write) is dropped first.

The options that decide the numbers (mode, effective verifier, HERO parameters with defaults
written out, where RM scores come from, the service's RM when it is called) are recorded next to
the output in ``<output>.meta.json``, so the output stays a plain JSONL of result lines for
downstream readers. A resume with other options, or into results without that record, exits 2
and names the difference (``--overwrite`` starts fresh): mixing them would report old results as
new. ``--batch-groups`` is not compared: it changes only where sigma-bar updates fall.

Bad input exits 2 with ``file:line: what and why``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, TextIO, get_args

from pydantic import ValidationError

from ._client import DEFAULT_URL, HeroClient
from ._errors import HeroError
from ._retry import RetryPolicy
from ._sigma import RunningSigma
from .schema import (
    Group,
    HeroParams,
    InfoResponse,
    Mode,
    RewardsResponse,
    VerifierName,
    VerifierStatus,
)
from .vocabulary import DISAGREEMENT_KINDS

NONZERO_ADVANTAGE = 1e-9  # |A| above this counts as a learning signal in the summary
# Rewards of one group further apart than this are a learning signal (as hero_service.metrics).
REWARD_SPREAD_SIGNAL = 1e-9
STATUSES = get_args(VerifierStatus)
META_SUFFIX = ".meta.json"
META_FORMAT = "hero-rewards score/1"


class InputError(ValueError):
    """A line of the input file that cannot become a group; the message says which and why."""


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hero-rewards score",
        description="Score a JSONL file of prompt groups (one group a line) with a hero-rewards "
                    "service; resumable, with a progress bar on stderr.")
    p.add_argument("input", type=Path, help="JSONL: id, prompt, reference, responses[, rm_scores]")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="JSONL of results; appended to, groups already in it are skipped (the "
                        "options that made it are kept in OUTPUT.meta.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh output instead of resuming (needed when the options "
                        "differ from the ones the output was made with)")
    p.add_argument("--url", default=os.environ.get("HERO_URL", DEFAULT_URL),
                   help="service base URL (env HERO_URL; default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("HERO_API_KEY"),
                   help="bearer key (env HERO_API_KEY)")
    p.add_argument("--mode", choices=get_args(Mode), default="hero")
    p.add_argument("--verifier", choices=get_args(VerifierName), default=None,
                   help="default: the server's")
    p.add_argument("--params", type=_json_object, default=None, metavar="JSON",
                   help='HERO parameters, e.g. \'{"alpha": 0.05, "advantage": "rloo"}\' '
                        "(sigma_ref is kept by the running mean unless given here)")
    p.add_argument("--batch-groups", type=int, default=16, metavar="N",
                   help="groups per batch (one sigma-bar update per batch; default %(default)s)")
    p.add_argument("--use-rm-scores", metavar="FIELD", default=None,
                   help="take each group's RM scores from this field (e.g. rm72b_scores) instead "
                        "of calling the service's RM; default: the 'rm_scores' field if present")
    p.add_argument("--summary", action="store_true",
                   help="print statistics of the whole output file (JSON, stdout) at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-attempts", type=int, default=6,
                   help="tries per request (429/503/connection errors back off; "
                        "default %(default)s)")
    return p


# ---------------------------------------------------------------- input


def _problems(exc: ValidationError) -> str:
    """Every problem of a pydantic error as ``field: why``, '; '-separated."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "group"
        parts.append(f"{loc}: {str(error['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def _prompt(row: dict[str, Any], where: str) -> Any:
    prompt = row.get("prompt", "")
    system = row.get("system")
    if system and isinstance(prompt, str):
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if system and isinstance(prompt, list):
        if not any(isinstance(m, dict) and m.get("role") == "system" for m in prompt):
            return [{"role": "system", "content": system}, *prompt]
        return prompt
    if prompt is None or isinstance(prompt, (str, list)):
        return prompt or ""
    raise InputError(f"{where}: 'prompt' must be a string or a list of chat messages")


def row_to_group(row: Any, line_no: int, rm_field: Optional[str], source: str = "<input>") -> Group:
    """One input line to a ``Group``; ``rm_field`` names the RM-score field (None: 'rm_scores'
    if present). Errors read ``source:line: ...``."""
    where = f"{source}:{line_no}"
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    gid = row.get("id")
    gid = str(gid) if gid is not None else f"line-{line_no}"
    where = f"{source}:{line_no}: id {gid!r}"
    if rm_field is not None:
        if rm_field not in row:
            raise InputError(f"{where}: no field {rm_field!r} (--use-rm-scores)")
        rm_scores = row[rm_field]
    else:
        rm_scores = row.get("rm_scores")
    try:
        return Group(id=gid, prompt=_prompt(row, where), reference=row.get("reference"),
                     responses=row.get("responses"), rm_scores=rm_scores)
    except ValidationError as exc:
        raise InputError(f"{where}: {_problems(exc)}") from None


def read_groups(path: Path, rm_field: Optional[str]) -> list[Group]:
    groups: list[Group] = []
    seen: dict[str, int] = {}
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
            group = row_to_group(row, line_no, rm_field, source=str(path))
            assert group.id is not None
            if group.id in seen:
                raise InputError(f"{path}:{line_no}: id {group.id!r} already used on line "
                                 f"{seen[group.id]} (ids must be unique to resume)")
            seen[group.id] = line_no
            groups.append(group)
    return groups


# ---------------------------------------------------------------- output / resume


def read_results(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The result lines of ``path`` (none if it does not exist). A torn last line (no newline:
    the process died mid-write) is ignored, and with ``repair`` cut off the file; any other
    line that is not a JSON object is an error (the file is not a result file)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        if repair:
            with path.open("r+b") as f:
                f.truncate(len(data))
    results: list[dict[str, Any]] = []
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "id" not in record:
            raise InputError(f"{path}:{line_no}: not a result line of hero-rewards score (choose "
                             "another -o, or --overwrite to replace the file)")
        results.append(record)
    return results


def sigma_after(results: Sequence[dict[str, Any]], momentum: float = 0.9) -> Optional[float]:
    """The running sigma-bar after the batches in ``results`` (in file order), rebuilt from the
    last batch: its ``sigma_ref`` (the value it was weighted with) updated with its sigmas."""
    if not results:
        return None
    last = results[-1].get("batch")
    batch = [r for r in results if r.get("batch") == last]
    before = batch[0].get("sigma_ref")
    running = RunningSigma(momentum, value=before)
    return running.update(r.get("sigma") for r in batch)


def result_lines(response: RewardsResponse, batch: int) -> Iterator[str]:
    for group in response.groups:
        record = {"id": group.id, **group.model_dump(mode="json", exclude={"id"}),
                  "sigma_ref": response.sigma_ref, "batch": batch}
        yield json.dumps(record, ensure_ascii=False)


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + META_SUFFIX)


def run_options(args: argparse.Namespace, params: Optional[HeroParams], info: InfoResponse,
                groups: Sequence[Group]) -> dict[str, Any]:
    """What decides this run's numbers, in a canonical form (the server's default verifier and
    the parameter defaults written out), so equal settings spelled differently compare equal."""
    calls_rm = any(g.rm_scores is None for g in groups)
    return {
        "mode": args.mode,
        "verifier": args.verifier or info.verifier,
        "params": (params or HeroParams()).model_dump(mode="json"),
        "rm_scores_field": args.use_rm_scores,
        "reward_model": info.reward_model if calls_rm else None,
    }


def read_meta(path: Path) -> Optional[dict[str, Any]]:
    """The recorded options (None if there is no record); an unreadable record is an error."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: cannot read the recorded options ({exc}); --overwrite to "
                         "start fresh") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("options"), dict):
        raise InputError(f"{path}: not an options record of hero-rewards score; --overwrite to "
                         "start fresh")
    return meta["options"]


def write_meta(path: Path, options: dict[str, Any], source: Path) -> None:
    from . import __version__

    record = {"format": META_FORMAT, "hero_rewards": __version__, "input": str(source),
              "options": options}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a killed run never leaves half a record


def _flat(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def option_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = _flat(recorded), _flat(current)
    return [f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def resume_refusal(output: Path, recorded: Optional[dict[str, Any]],
                   current: dict[str, Any]) -> Optional[str]:
    """Why results already in ``output`` must not be resumed into with ``current`` (None: ok)."""
    fix = ("run with the options it was made with, --overwrite to score from scratch, or "
           "choose another -o")
    meta = meta_path(output)
    if recorded is None:
        return (f"{output} holds results but no record of the options that made them ({meta} "
                f"is missing), so resuming could mix results of different options; {fix}")
    diffs = option_differences(recorded, current)
    if diffs:
        return (f"{output} was made with other options ({'; '.join(diffs)}); resuming would "
                f"mix results of both (recorded in {meta}); {fix}")
    return None


# ---------------------------------------------------------------- summary


def summarize(results: Sequence[dict[str, Any]], sigma_ref: Optional[float]) -> dict[str, Any]:
    """Statistics of result lines: verifier status counts, reward mean/min/max (over rollouts),
    mean weight (over groups), the running sigma-bar, groups with a non-zero advantage, and the
    service's reward diagnostics (``hero_disagreements_total`` and
    ``hero_verifier_no_signal_groups_total`` counted over the file)."""
    statuses = {s: 0 for s in STATUSES}
    rewards: list[float] = []
    weights: list[float] = []
    with_signal = 0
    disagreements = {kind: 0 for kind in DISAGREEMENT_KINDS}
    no_signal = {verdicts: {"reward_signal": 0, "no_reward_signal": 0}
                 for verdicts in ("all_correct", "all_wrong")}
    for r in results:
        for s in r.get("verifier_status", []):
            statuses[s] = statuses.get(s, 0) + 1
        group_rewards = r.get("rewards", [])
        rewards.extend(group_rewards)
        weights.append(r["weight"])
        advantages = r.get("advantages") or []
        if any(abs(a) > NONZERO_ADVANTAGE for a in advantages):
            with_signal += 1
        for kind in r.get("disagreement") or []:
            if kind is not None:
                disagreements[kind] = disagreements.get(kind, 0) + 1
        verified = r.get("verified", [])
        if len(verified) > 1 and all(v == verified[0] for v in verified):
            spread = max(group_rewards) - min(group_rewards) > REWARD_SPREAD_SIGNAL
            no_signal["all_correct" if verified[0] else "all_wrong"][
                "reward_signal" if spread else "no_reward_signal"] += 1
    return {
        "groups": len(results),
        "rollouts": len(rewards),
        "verifier_status": {k: v for k, v in statuses.items() if v or k in STATUSES[:5]},
        "reward": {
            "mean": math.fsum(rewards) / len(rewards) if rewards else None,
            "min": min(rewards) if rewards else None,
            "max": max(rewards) if rewards else None,
        },
        "weight_mean": math.fsum(weights) / len(weights) if weights else None,
        "sigma_ref": sigma_ref,
        "groups_with_nonzero_advantage": with_signal,
        "disagreements": disagreements,
        "verifier_no_signal_groups": no_signal,
    }


# ---------------------------------------------------------------- progress


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, disable: bool, stream: TextIO) -> Any:
    if disable:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        print("hero-rewards score: install tqdm for a progress bar", file=stream)
        return _NoBar()
    # The rate and ETA count this run's rollouts only (initial= is the resumed part).
    return tqdm(total=total, initial=initial, unit=" rollouts", file=stream, dynamic_ncols=True,
                smoothing=0.1, desc="scoring")


# ---------------------------------------------------------------- main


def _parse_params(raw: Optional[dict[str, Any]]) -> Optional[HeroParams]:
    if raw is None:
        return None
    try:
        return HeroParams.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"--params: {_problems(exc)}") from None


def run(args: argparse.Namespace, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    if args.batch_groups < 1:
        print("hero-rewards score: --batch-groups must be >= 1", file=stderr)
        return 2
    meta = meta_path(args.output)
    try:
        params = _parse_params(args.params)
        groups = read_groups(args.input, args.use_rm_scores)
        # Read only: the output is repaired (torn line) once its options are known to match.
        done = [] if args.overwrite else read_results(args.output)
        recorded = read_meta(meta) if done else None
    except (InputError, OSError) as exc:
        print(f"hero-rewards score: {exc}", file=stderr)
        return 2

    done_ids = {r.get("id") for r in done}
    todo = [g for g in groups if g.id not in done_ids]
    batch_no = max((r.get("batch", -1) for r in done), default=-1) + 1
    running = RunningSigma(value=sigma_after(done))
    total = sum(len(g.responses) for g in groups)
    bar: Any = _NoBar()
    started = time.monotonic()
    status = 0
    batch: list[Group] = []
    try:
        with HeroClient(args.url, api_key=args.api_key, timeout=args.timeout,
                        retry=RetryPolicy(max_attempts=max(1, args.max_attempts)),
                        running_sigma=running) as client:
            options = run_options(args, params, client.info(), groups)
            refusal = resume_refusal(args.output, recorded, options) if done else None
            if refusal is not None:
                print(f"hero-rewards score: {refusal}", file=stderr)
                return 2
            args.output.parent.mkdir(parents=True, exist_ok=True)
            if done:
                read_results(args.output, repair=True)
                print(f"hero-rewards score: resuming: {len(groups) - len(todo)} of "
                      f"{len(groups)} groups already in {args.output}", file=stderr)
            else:  # fresh (or --overwrite): nothing of an earlier run may stay
                args.output.write_bytes(b"")
            write_meta(meta, options, args.input)
            bar = _progress(total, total - sum(len(g.responses) for g in todo), args.no_progress,
                            stderr)
            with args.output.open("a") as out:
                for start in range(0, len(todo), args.batch_groups):
                    batch = todo[start:start + args.batch_groups]
                    response = client.score(batch, mode=args.mode, verifier=args.verifier,
                                            params=params, request_id=f"score/{batch_no}")
                    out.write("".join(line + "\n" for line in result_lines(response, batch_no)))
                    out.flush()
                    batch_no += 1
                    bar.update(sum(len(g.responses) for g in batch))
    except HeroError as exc:
        where = f" (batch starting at group {batch[0].id!r})" if batch else ""
        print(f"\nhero-rewards score: {exc}{where}; finished groups are kept in {args.output}, "
              "run again to resume", file=stderr)
        status = 1
    except KeyboardInterrupt:
        print("\nhero-rewards score: interrupted; run again to resume", file=stderr)
        status = 130
    finally:
        bar.close()
    elapsed = time.monotonic() - started

    if status == 0 and not args.no_progress:
        scored = sum(len(g.responses) for g in todo)
        print(f"hero-rewards score: {len(todo)} groups ({scored} rollouts) scored in "
              f"{elapsed:.1f}s -> {args.output}", file=stderr)
    if args.summary:
        with contextlib.suppress(InputError):
            results = read_results(args.output)
            print(json.dumps(summarize(results, running.value), indent=2), file=stdout)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)
