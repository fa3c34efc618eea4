"""Benchmark workloads derived from the real dev rollouts (50 MATH groups x 8 responses).

* ``1x``  = the 50 groups of 8 as they are in the file (400 rollouts).
* ``4x``  = 200 groups of 8: each original group is resampled 4 times (8 responses drawn with
  replacement from its 8, fixed seed).
* ``16x`` = 400 groups of 16: each original group is resampled 8 times (16 responses drawn with
  replacement from its 8).

Every response — derived or not, in every *pass* over a workload (the benchmark's callers cycle
through a workload when a measurement outlasts it) — gets a distinguishing PREFIX such as
``"(rollout ab qk) "``. The service scores each identical (response, reference) pair and each
identical response of a group only once, so without the tag resampled copies would collapse and
inflate throughput. Even the file itself repeats itself: 40 of its 400 responses are exact
duplicates of another in their group (short problems sampled to the same text), which the
service would score once — a real 10 % saving on this file, but one the bare-forward limit, the
naive server and the TRL-style path do not get, so the benchmark tags those too and every system
does one forward per rollout. The tag is a prefix, not a suffix, and letters only, because:

* the embedded RM scores the *last* 128 tokens of a response, so a prefix leaves the tokens the
  model sees unchanged (every response in this file is longer than 128 tokens): a derived rollout
  costs exactly what its original costs, which is what a scale comparison needs;
* the final ``\\boxed{}`` answer stays where it was, and there are no digits for math-verify to
  pick up: the verifier gives every tagged copy the verdict of its original (375 of 400 correct).

The benchmark checks the service's ``hero_deduplicated_rollouts`` counter stays at 0."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get(
    "HERO_DEV_DATA", REPO.parent / "shared" / "data" / "math-rollouts-dev.jsonl"))

SCALES = {1: (1, 8), 4: (4, 8), 16: (8, 16)}  # scale -> (copies per original group, group size)

Rollout = tuple[str, str, str, bool]  # (prompt, response, reference, grader_correct)


def letters(n: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'ba', ... (no digits, so nothing parses as a number)."""
    out = ""
    while True:
        out = chr(ord("a") + n % 26) + out
        n //= 26
        if n == 0:
            return out


@dataclass(frozen=True)
class BenchGroup:
    id: str
    prompt: str
    reference: str
    responses: tuple[str, ...]
    correct: tuple[bool, ...]  # the original grader's labels (for a sanity column only)

    def as_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "reference": self.reference,
                "responses": list(self.responses)}


def load_rows(path: Optional[Path] = None) -> list[dict]:
    with (path or DEFAULT_DATA).open() as f:
        return [json.loads(line) for line in f if line.strip()]


class Workload:
    """One scale of the benchmark. ``groups(pass_no)`` is the workload's content for the given
    pass, every response with a tag prefix unique within the pass (and across passes)."""

    def __init__(self, rows: list[dict], scale: int, seed: int = 0) -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)}")
        self.scale = scale
        self.name = f"{scale}x"
        copies, self.group_size = SCALES[scale]
        rng = random.Random(seed * 1000 + scale)
        # (group id, prompt, reference, [(response, correct, needs_tag)]) before tagging.
        self._base: list[tuple[str, str, str, list[tuple[str, bool]]]] = []
        for row in rows:
            pairs = list(zip(row["responses"], row["grader_correct"]))
            for c in range(copies):
                if scale == 1:
                    chosen = pairs
                else:
                    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(self.group_size)]
                self._base.append((f"{row['id']}#{c}", row["prompt"], row["reference"], chosen))
        self.n_groups = len(self._base)
        self.n_rollouts = sum(len(b[3]) for b in self._base)
        self.file_duplicates = sum(len(r["responses"]) - len(set(r["responses"])) for r in rows)

    def groups(self, pass_no: int = 0) -> list[BenchGroup]:
        out = []
        counter = 0
        for gid, prompt, reference, chosen in self._base:
            responses = []
            for response, _ in chosen:
                response = f"(rollout {letters(pass_no)} {letters(counter)}) {response}"
                counter += 1
                responses.append(response)
            out.append(BenchGroup(f"{gid}@{pass_no}", prompt, reference, tuple(responses),
                                  tuple(c for _, c in chosen)))
        return out

    def group_stream(self, max_passes: int = 1000) -> Iterator[BenchGroup]:
        for pass_no in range(max_passes):
            yield from self.groups(pass_no)

    def request_stream(self, groups_per_request: int) -> Iterator[list[BenchGroup]]:
        """Several-group requests, in dataset order, cycling through passes."""
        batch: list[BenchGroup] = []
        for group in self.group_stream():
            batch.append(group)
            if len(batch) == groups_per_request:
                yield batch
                batch = []

    def single_stream(self) -> Iterator[Rollout]:
        """(prompt, response, reference, grader_correct) one rollout at a time (OpenRLHF)."""
        for group in self.group_stream():
            for response, correct in zip(group.responses, group.correct):
                yield group.prompt, response, group.reference, correct
