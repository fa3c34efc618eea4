"""TRL on two processes: the real ``trl.GRPOTrainer`` under torchrun (2 CPU processes, gloo),
per_device_train_batch_size=3 and num_generations=2, so TRL's contiguous split of each
generation batch cuts a group in two. The reward function sends pieces; one live service (no
``--group-size``) assembles them: every completion gets HERO of its whole group."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from support import free_port

from hero_client import HeroClient

WORKER = Path(__file__).resolve().parent / "trl_two_process_worker.py"
PROCESSES = 2
PER_DEVICE_BATCH = 3
NUM_GENERATIONS = 2
RUN_TIMEOUT_S = 300


def run_two_process_trl(url: str, rows: list[dict], out: Path, run: str) -> list[dict]:
    """torchrun the worker on ``PROCESSES`` CPU processes; their records, by rank."""
    dataset = out / "dataset.json"
    dataset.write_text(json.dumps([{"prompt": r["prompt"], "reference": r["reference"]}
                                   for r in rows]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(WORKER), url, "test-key", str(dataset), str(out), run]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        log, _ = proc.communicate(timeout=30)
        pytest.fail(f"two-process TRL run did not finish in {RUN_TIMEOUT_S}s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(PROCESSES)]


def test_two_process_trl_split_gets_whole_group_rewards(server, dev_rows, tmp_path):
    run = f"trl-two-process-{uuid.uuid4().hex[:8]}"
    ranks = run_two_process_trl(server.url, dev_rows[:8], tmp_path, run)

    assert [r["world_size"] for r in ranks] == [PROCESSES] * PROCESSES
    assert [r["global_step"] for r in ranks] == [2, 2]
    calls = [r["calls"] for r in ranks]
    assert [len(c) for c in calls] == [2, 2]  # one generation batch per step, on each process
    answers = {r["prompt"]: r["reference"] for r in dev_rows[:8]}
    cut_group_sigmas: list[float] = []
    with HeroClient(server.url, api_key="test-key") as client:
        for step in range(2):
            per_rank = [c[step] for c in calls]
            assert [c["global_step"] for c in per_rank] == [step, step]
            # TRL's global batch is the processes' slices end to end; groups at multiples of 2
            prompts = [p for c in per_rank for p in c["prompts"]]
            completions = [x for c in per_rank for x in c["completions"]]
            rewards = [x for c in per_rank for x in c["rewards"]]
            assert [len(c["prompts"]) for c in per_rank] == [PER_DEVICE_BATCH] * PROCESSES
            # (position in the global batch, the piece's group result) for every completion
            results = [(r * PER_DEVICE_BATCH + at + i, r, g) for r, c in enumerate(per_rank)
                       for g, at in zip(c["groups"], piece_starts(c["groups"]))
                       for i in range(len(g["rewards"]))]
            assert all(not g["partial"] for _, _, g in results)
            starts = range(0, len(prompts), NUM_GENERATIONS)
            whole = client.score([{"prompt": [{"role": "user", "content": prompts[s]}],
                                   "reference": answers[prompts[s]],
                                   "responses": completions[s:s + NUM_GENERATIONS]}
                                  for s in starts])
            for s, direct in zip(starts, whole.groups):
                assert len(set(prompts[s:s + NUM_GENERATIONS])) == 1
                pieces = [g for at, _, g in results if s <= at < s + NUM_GENERATIONS]
                # one weight and sigma for the group, on both processes: scored once, whole
                assert len({g["weight"] for g in pieces}) == 1
                weight = pieces[0]["weight"]
                assert 0.4 <= weight <= 3.0
                assert pieces[0]["sigma"] == pytest.approx(direct.sigma, abs=1e-6)
                # HERO of the whole group: its stratified normalisation, times that weight
                assert rewards[s:s + NUM_GENERATIONS] == pytest.approx(
                    [weight * r for r in direct.normalized], abs=1e-6)
                if s // PER_DEVICE_BATCH != (s + 1) // PER_DEVICE_BATCH:  # a cut group
                    assert sorted(r for at, r, _ in results
                                  if s <= at < s + NUM_GENERATIONS) == [0, 1]
                    cut_group_sigmas.append(direct.sigma)
    assert len(cut_group_sigmas) == 2  # the middle group of each step was cut
    # scored alone, a one-completion piece has sigma 0; these got their whole group's
    assert max(cut_group_sigmas) > 0

    # TRL gathered the same rewards from both processes for its last generation batch
    last = [c[-1] for c in calls]
    for record in ranks:
        assert record["gathered_prompts"] == [p for c in last for p in c["prompts"]]
        assert record["gathered_rewards"] == pytest.approx(
            [x for c in last for x in c["rewards"]], abs=1e-6)
        assert record["client_sigma_ref"] is None  # pieces never use the process's own
    # one sigma-bar for both processes: the service's series for this run
    info = httpx.get(server.url + "/v1/info", headers={"Authorization": "Bearer test-key"},
                     timeout=10).json()
    assert math.isfinite(info["running_sigma_ref"][run])


def piece_starts(groups: list[dict]) -> list[int]:
    """Where each returned group (piece) starts in its process's slice."""
    starts, at = [], 0
    for g in groups:
        starts.append(at)
        at += len(g["rewards"])
    return starts
