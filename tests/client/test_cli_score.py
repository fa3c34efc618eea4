"""``hero-rewards score``: the real command in a subprocess against a real service, on the dev
data as it is (system + prompt fields, rm72b_scores)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from support import DEV_DATA, free_port

from hero_client import HeroClient


def run_score(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hero_client.cli", "score", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def replay_sigma(results: list[dict]) -> tuple[list[float | None], float | None]:
    """Independently of the CLI: the sigma-bar each batch should have been sent, and the final
    one (first batch: its mean sigma; then 0.9 * bar + 0.1 * batch mean)."""
    batches: dict[int, list[float]] = {}
    for r in results:
        batches.setdefault(r["batch"], []).append(r["sigma"])
    sent, bar = [], None
    for b in sorted(batches):
        sent.append(bar)
        mean = sum(batches[b]) / len(batches[b])
        bar = mean if bar is None else 0.9 * bar + 0.1 * mean
    return sent, bar


def test_score_cli_scores_the_dev_file_with_progress_and_a_correct_summary(server, dev_rows,
                                                                          tmp_path):
    out = tmp_path / "scored.jsonl"
    proc = run_score(DEV_DATA, "-o", out, "--url", server.url, "--api-key", "test-key",
                     "--use-rm-scores", "rm72b_scores", "--batch-groups", "16", "--summary")
    assert proc.returncode == 0, proc.stderr

    # progress bar on stderr: rollouts/s, the total, an ETA field; nothing of it on stdout
    assert "rollouts/s" in proc.stderr and "400/400" in proc.stderr
    assert "<" in proc.stderr.split("400/400")[-1].split("]")[0]  # [elapsed<remaining, rate]
    assert "rollouts/s" not in proc.stdout

    results = read_jsonl(out)
    assert [r["id"] for r in results] == [row["id"] for row in dev_rows]
    assert [r["batch"] for r in results] == [i // 16 for i in range(50)]
    for r, row in zip(results, dev_rows):
        assert r["rm_scores"] == pytest.approx(row["rm72b_scores"])  # no RM call: the field's
        assert len(r["rewards"]) == len(r["advantages"]) == len(r["verifier_status"]) == 8
    # math-verify agrees with the grader on this data (799/800 on the full 100-row file)
    agree = sum(v == g for r, row in zip(results, dev_rows)
                for v, g in zip(r["verified"], row["grader_correct"]))
    assert agree >= 399

    # each batch went out with the client's running sigma-bar
    sent, final_bar = replay_sigma(results)
    first_batch_mean = sum(r["sigma"] for r in results[:16]) / 16
    assert results[0]["sigma_ref"] == pytest.approx(first_batch_mean)  # no bar yet: request mean
    for b, expected in enumerate(sent[1:], 1):
        assert all(r["sigma_ref"] == pytest.approx(expected) for r in results if r["batch"] == b)

    # the summary, recomputed here from OUT
    summary = json.loads(proc.stdout)
    rewards = [x for r in results for x in r["rewards"]]
    statuses: dict[str, int] = {}
    for r in results:
        for s in r["verifier_status"]:
            statuses[s] = statuses.get(s, 0) + 1
    assert summary["groups"] == 50 and summary["rollouts"] == 400
    assert {k: v for k, v in summary["verifier_status"].items() if v} == statuses
    assert summary["reward"]["mean"] == pytest.approx(sum(rewards) / 400)
    assert summary["reward"]["min"] == min(rewards) and summary["reward"]["max"] == max(rewards)
    assert summary["weight_mean"] == pytest.approx(sum(r["weight"] for r in results) / 50)
    assert summary["sigma_ref"] == pytest.approx(final_bar)
    nonzero = sum(any(abs(a) > 1e-9 for a in r["advantages"]) for r in results)
    assert summary["groups_with_nonzero_advantage"] == nonzero
    assert 0 < nonzero <= 50

    # and the numbers are the service's: batch 2 re-scored through the SDK with the same
    # chat prompt and sigma_ref gives the same rewards
    rows = dev_rows[16:32]
    groups = [{"id": row["id"], "reference": row["reference"], "responses": row["responses"],
               "rm_scores": row["rm72b_scores"],
               "prompt": [{"role": "system", "content": row["system"]},
                          {"role": "user", "content": row["prompt"]}]} for row in rows]
    with HeroClient(server.url, api_key="test-key") as client:
        direct = client.score(groups, sigma_ref=results[16]["sigma_ref"])
    for g, r in zip(direct.groups, results[16:32]):
        assert g.rewards == pytest.approx(r["rewards"]) and g.weight == pytest.approx(r["weight"])


def test_score_cli_resume_appends_only_missing_groups(server, dev_rows, tmp_path):
    full_in = write_jsonl(tmp_path / "full.jsonl", dev_rows)
    half_in = write_jsonl(tmp_path / "half.jsonl", dev_rows[:25])
    common = ["--url", server.url, "--api-key", "test-key", "--use-rm-scores", "rm72b_scores",
              "--batch-groups", "5", "--no-progress"]

    resumed = tmp_path / "resumed.jsonl"
    first = run_score(half_in, "-o", resumed, *common)
    assert first.returncode == 0, first.stderr
    assert len(read_jsonl(resumed)) == 25
    # a run killed mid-write leaves a torn last line: it is cut off, not mistaken for a result
    with resumed.open("a") as f:
        f.write('{"id": "math_cot_100/25", "sigma": 0.1, "wei')
    second = run_score(full_in, "-o", resumed, *common, "--summary")
    assert second.returncode == 0, second.stderr
    assert "resuming: 25 of 50" in second.stderr

    results = read_jsonl(resumed)
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == 50
    assert ids == [row["id"] for row in dev_rows]
    assert [r["batch"] for r in results] == [i // 5 for i in range(50)]
    assert json.loads(second.stdout)["groups"] == 50  # the summary covers the whole file

    # nothing to do: a third run scores nothing and changes nothing
    before = resumed.read_bytes()
    third = run_score(full_in, "-o", resumed, *common)
    assert third.returncode == 0 and resumed.read_bytes() == before

    # with batch boundaries that line up, resuming rebuilds sigma-bar exactly: the result equals
    # one uninterrupted run
    straight = tmp_path / "straight.jsonl"
    assert run_score(full_in, "-o", straight, *common).returncode == 0
    for a, b in zip(read_jsonl(straight), results):
        assert a["id"] == b["id"] and a["sigma_ref"] == pytest.approx(b["sigma_ref"])
        assert a["rewards"] == pytest.approx(b["rewards"])


def test_score_cli_calls_the_service_rm_when_no_scores_are_given(server, dev_rows, tmp_path):
    # two small groups, the second with a chat prompt and no system field; no rm_scores at all
    rows = [{"id": "a", "prompt": dev_rows[0]["prompt"], "reference": dev_rows[0]["reference"],
             "responses": dev_rows[0]["responses"][:3] + ["I am not sure."]},
            {"id": "b", "prompt": [{"role": "user", "content": dev_rows[1]["prompt"]}],
             "reference": dev_rows[1]["reference"], "responses": dev_rows[1]["responses"][:3]}]
    src = write_jsonl(tmp_path / "small.jsonl", rows)
    out = tmp_path / "small-out.jsonl"
    proc = run_score(src, "-o", out, "--url", server.url, "--api-key", "test-key", "--summary")
    assert proc.returncode == 0, proc.stderr
    a, b = read_jsonl(out)
    assert a["verifier_status"][3] == "no_answer" and a["rewards"][3] <= 0.1 * a["weight"] + 1e-9
    for r in (a, b):
        assert r["rm_scores"] is not None
        assert all(-1.0 <= s <= 1.0 for s in r["rm_scores"])  # the embedded RM: a cosine
        assert r["sigma"] == pytest.approx(_pstd(r["rm_scores"]))
    # one batch, no sigma-bar yet: the request's mean sigma
    assert a["sigma_ref"] == pytest.approx((a["sigma"] + b["sigma"]) / 2)
    assert json.loads(proc.stdout)["sigma_ref"] == pytest.approx((a["sigma"] + b["sigma"]) / 2)

    # --mode verifier: reward = v, weight 1
    out_v = tmp_path / "small-verifier.jsonl"
    proc = run_score(src, "-o", out_v, "--url", server.url, "--api-key", "test-key",
                     "--mode", "verifier", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for r in read_jsonl(out_v):
        assert r["rewards"] == [1.0 if v else 0.0 for v in r["verified"]] and r["weight"] == 1.0


def test_score_cli_rejects_bad_input_with_the_line_and_field(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"id": "ok", "prompt": "p", "reference": "1", "responses": ["1"]})
                   + "\n" + json.dumps({"id": "broken", "prompt": "p", "responses": ["1", "2"],
                                        "rm_scores": [0.5]}) + "\n")
    proc = run_score(src, "-o", tmp_path / "out.jsonl", "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2
    # file:line first, as compilers write it, so an editor can jump to it
    assert f"{src}:2: " in proc.stderr, proc.stderr
    assert "'broken'" in proc.stderr and "rm_scores" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()

    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "responses": ["a"]}] * 2)
    proc = run_score(dup, "-o", tmp_path / "out.jsonl", "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2
    assert f"{dup}:2: " in proc.stderr and "already used on line 1" in proc.stderr

    not_json = tmp_path / "not-json.jsonl"
    not_json.write_text(json.dumps({"id": "a", "responses": ["1"]}) + "\n\n" + "{oops\n")
    proc = run_score(not_json, "-o", tmp_path / "out.jsonl", "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2 and f"{not_json}:3: not JSON" in proc.stderr, proc.stderr

    # an output file that is not a result file: named with its line, never appended to
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "a", "responses": ["1"]}])
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": "a", "rewards": [1.0]}\n[1, 2]\n')
    proc = run_score(good, "-o", foreign, "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2 and f"{foreign}:2: " in proc.stderr, proc.stderr
    assert foreign.read_text() == '{"id": "a", "rewards": [1.0]}\n[1, 2]\n'

    bad_params = run_score(good, "-o", tmp_path / "out.jsonl", "--url", "http://127.0.0.1:9",
                           "--params", '{"alpha": -1}')
    assert bad_params.returncode == 2
    assert "--params" in bad_params.stderr and "alpha" in bad_params.stderr


def test_score_cli_reports_an_unreachable_service_and_keeps_going_resumable(dev_rows, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", dev_rows[:2])
    out = tmp_path / "out.jsonl"
    proc = run_score(src, "-o", out, "--url", f"http://127.0.0.1:{free_port()}",
                     "--use-rm-scores", "rm72b_scores", "--no-progress", "--max-attempts", "2",
                     timeout=120)
    assert proc.returncode == 1
    assert "run again to resume" in proc.stderr
    assert not out.exists() or out.read_text() == ""


def test_score_cli_records_its_options_and_refuses_to_resume_with_others(server, dev_rows,
                                                                        tmp_path):
    """Resuming into an output made with other options would print old results as new: the
    options live in ``<out>.meta.json``, a resume with others exits 2 naming them, and
    ``--overwrite`` starts fresh. The output itself stays a plain JSONL of result lines."""
    src = write_jsonl(tmp_path / "in.jsonl", dev_rows[:6])
    half = write_jsonl(tmp_path / "half.jsonl", dev_rows[:3])
    out = tmp_path / "out.jsonl"
    meta = tmp_path / "out.jsonl.meta.json"
    common = ["--url", server.url, "--api-key", "test-key", "--batch-groups", "3", "--no-progress"]
    rm = ["--use-rm-scores", "rm72b_scores"]

    first = run_score(half, "-o", out, *common, *rm, "--params", '{"alpha": 0.05}')
    assert first.returncode == 0, first.stderr
    recorded = json.loads(meta.read_text())
    assert recorded["options"]["mode"] == "hero"
    assert recorded["options"]["verifier"] == "math"  # the server's default, made explicit
    assert recorded["options"]["params"]["alpha"] == 0.05
    assert recorded["options"]["rm_scores_field"] == "rm72b_scores"
    results = read_jsonl(out)
    assert len(results) == 3 and all("rewards" in r and "id" in r for r in results)
    scored = out.read_bytes()

    # every differing option is refused, before anything is sent or written
    for other, named in [
        (["--mode", "verifier", *rm, "--params", '{"alpha": 0.05}'], "mode"),
        ([*rm], "params.alpha"),  # the default alpha 0.1 now
        ([*rm, "--params", '{"alpha": 0.05, "advantage": "rloo"}'], "params.advantage"),
        ([*rm, "--params", '{"alpha": 0.05}', "--verifier", "exact"], "verifier"),
        (["--params", '{"alpha": 0.05}'], "rm_scores_field"),  # the service's RM now
    ]:
        proc = run_score(src, "-o", out, *common, *other)
        assert proc.returncode == 2, (other, proc.stderr)
        assert named in proc.stderr and "--overwrite" in proc.stderr, (other, proc.stderr)
        assert out.read_bytes() == scored and json.loads(meta.read_text()) == recorded

    # the same options, spelled differently (defaults written out, the server's verifier
    # named): a resume
    same = run_score(src, "-o", out, *common, *rm, "--verifier", "math",
                     "--params", '{"alpha": 0.05, "beta": 0.1}')
    assert same.returncode == 0, same.stderr
    assert "resuming: 3 of 6" in same.stderr
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in dev_rows[:6]]

    # --overwrite: a fresh run with the new options; nothing of the old one is left
    fresh = run_score(src, "-o", out, *common, *rm, "--mode", "verifier", "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert "resuming" not in fresh.stderr
    results = read_jsonl(out)
    assert [r["id"] for r in results] == [r["id"] for r in dev_rows[:6]]
    assert [r["batch"] for r in results] == [0, 0, 0, 1, 1, 1]
    for r in results:
        assert r["rewards"] == [1.0 if v else 0.0 for v in r["verified"]] and r["weight"] == 1.0
    assert json.loads(meta.read_text())["options"]["mode"] == "verifier"

    # results without the record of what made them: refused too (nothing to compare with)
    meta.unlink()
    proc = run_score(src, "-o", out, *common, *rm, "--mode", "verifier")
    assert proc.returncode == 2 and "meta.json" in proc.stderr and "--overwrite" in proc.stderr


def test_score_cli_version():
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "hero_client.cli", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"hero-rewards {version('hero-rewards')}\n"
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'version = "{version("hero-rewards")}"' in pyproject  # the installed one is this one


def _pstd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
