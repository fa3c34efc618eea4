"""The GPU benchmark's script, on CPU: ``bench/gpu.sh run --tiny --device cpu`` (the wrapper the
device machine runs, then ``bench/gpu.py``'s every section with a tiny random Qwen2 RM), and its
small pieces in-process. No GPU needed: the device run itself is a manual step
(bench/README.md, "GPU")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Appended, not prepended: the bench modules' plain names must not shadow anything else.
sys.path.append(str(REPO / "bench"))

import gpu

DEV_ARMS = {"bare", "bare_4x_budget", "grouped_sharing", "grouped_unshared",
            "per_sample_sharing", "per_sample_unshared", "naive", "trl_style"}
LONG_ARMS = {"bare", "grouped_sharing", "grouped_unshared"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu-out")
    carry = tmp_path_factory.mktemp("gpu-carry")  # empty: no wheels, the default dev data
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "run", "--tiny", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable,
             "HERO_GPU_CARRY": str(carry)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"gpu.sh run --tiny took {time.monotonic() - started:.0f}s")
    return json.loads((out / "gpu.json").read_text()), proc.stdout, out


def test_every_arm_scores_every_rollout_as_the_bare_forward(tiny_run: tuple[dict, str, Path]
                                                            ) -> None:
    result, _, _ = tiny_run
    for name, arms in (("dev", DEV_ARMS), ("long", LONG_ARMS)):
        x = result[name]
        assert x["errors"] == {}, name
        assert set(x["arms"]) == arms, name
        w = x["workload"]
        assert w["rollouts"] == 8 * w["groups"] > 0 and w["truncated"] == 0
        assert w["shared_fraction"] == 1.0 and w["prompt_tokens"] > 0
        # Responses of the plan's length range (tiny: 48-96 tokens) under their prompt.
        assert w["min_tokens"] >= w["prompt_tokens"] + gpu.TINY.response_tokens[0] - 1
        for arm, a in x["arms"].items():
            assert a["rollouts_per_s"] > 0 and a["tokens_per_s"] > 0, (name, arm)
            assert a["forwards"] > 0 and a["computed_tokens"] > 0, (name, arm)
            assert a["missing_scores"] == 0, (name, arm)
            assert a["mfu_measured"] > 0 and a["mfu_peak"] is None, (name, arm)  # CPU: no peak
            if arm != "bare":
                # fp32 on CPU: every batching, shared or not, gives the bare forward's scores.
                assert a["max_abs_score_diff"] <= 1e-4, (name, arm)
        arms_ = x["arms"]
        assert arms_["bare"]["x_reference"] == 1.0
        assert arms_["grouped_sharing"]["computed_tokens"] < \
            arms_["grouped_unshared"]["computed_tokens"] == w["tokens"]
    dev = result["dev"]["arms"]
    assert dev["naive"]["mean_batch"] == 1.0  # a batch of one, each
    assert dev["trl_style"]["mean_batch"] == 8.0  # one group, unsorted, per forward
    assert dev["per_sample_sharing"]["computed_tokens"] < \
        dev["per_sample_unshared"]["computed_tokens"]
    # The long few-shot prompt is computed once per group instead of 8 times.
    long = result["long"]["arms"]
    assert long["grouped_sharing"]["computed_tokens"] < 0.75 * long["bare"]["computed_tokens"]


def test_the_forced_batch_splits_on_out_of_memory_and_keeps_its_scores(
        tiny_run: tuple[dict, str, Path]) -> None:
    oom = tiny_run[0]["oom"]
    n = oom["rollouts"]
    assert oom["cap"]["mechanism"].startswith("CPU stand-in")
    # The whole request went into one forward first, which ran out of memory, and was split.
    assert oom["failed_forward_sizes"][0] == n
    assert oom["oom_splits"] == len(oom["failed_forward_sizes"]) >= 1
    assert sum(oom["forward_sizes"]) == n and max(oom["forward_sizes"]) < n
    assert oom["scored"] == n
    assert oom["max_abs_diff_vs_small_batches"] <= oom["tolerance"] == 1e-4
    assert oom["ok"] is True
    assert all(t["pass"] for t in tiny_run[0]["targets"]), tiny_run[0]["targets"]


def test_the_results_come_back_as_json_table_and_log(tiny_run: tuple[dict, str, Path]) -> None:
    result, stdout, out = tiny_run
    table = (out / "gpu.txt").read_text()
    assert table.strip() in stdout
    assert table.strip() == gpu.render(result)  # the table is a function of the JSON alone
    assert "out-of-memory split:" in table and "targets:" in table
    assert "naive per-sample" in table and "TRL-style" in table
    assert "out of memory on a batch" in (out / "gpu.log").read_text()  # the batcher's warning
    assert result["chip"]["matmul"]["tflops"] > 0
    assert result["meta"]["plan"]["name"] == "tiny" and result["duration_s"] > 0
    model = result["model"]
    assert model["shares_prefixes"] is True
    assert model["non_embedding_params"] > 0 and model["vocab"] >= model["tokenizer_ids"]


def test_an_arm_that_fails_is_recorded_and_the_others_go_on() -> None:
    """A device run is too dear to lose to one arm: the failure is kept, the rest measured."""
    def ok() -> gpu.ArmRun:
        return gpu.ArmRun(0.5, {"k": 1.0}, forwards=1, computed_tokens=10, padded_tokens=12,
                          peak_memory_mb=None)

    def broken() -> gpu.ArmRun:
        raise RuntimeError("no kernel for this shape")

    errors: dict[str, str] = {}
    runs = gpu.interleaved({"bare": broken, "grouped_sharing": ok}, rounds=3,
                           stop_after=float("inf"), errors=errors)
    assert errors == {"bare": "RuntimeError: no kernel for this shape"}
    assert runs["bare"] == [] and len(runs["grouped_sharing"]) == 3
    # 2 x 100 params x 10 tokens / 0.5 s = 4000 FLOP/s against a measured 8000.
    chip = gpu.Chip("cpu", "cpu", "float32", None, {"n": 8, "dtype": "float32", "tflops": 8e-9})
    summary = gpu.summary(runs["grouped_sharing"], {"rollouts": 2, "tokens": 10}, [], 100, chip)
    # Without the bare arm there is nothing to compare with: None, not a made-up ratio.
    assert summary["x_reference"] is None and summary["max_abs_score_diff"] is None
    assert summary["rollouts_per_s"] == 4.0 and summary["mfu_measured"] == 0.5


def test_the_table_shows_a_failed_arm_and_a_missing_reference(
        tiny_run: tuple[dict, str, Path]) -> None:
    result = json.loads(json.dumps(tiny_run[0]))
    dev = result["dev"]
    del dev["arms"]["bare"]
    dev["errors"] = {"bare": "OutOfMemoryError: CUDA out of memory"}
    for arm in dev["arms"].values():
        arm["x_reference"] = arm["max_abs_score_diff"] = None
    table = gpu.render(result)
    assert "FAILED bare: OutOfMemoryError: CUDA out of memory" in table
    assert "service, 2 callers x 1 group, sharing on" in table


def test_the_chips_peak_is_looked_up_by_device_name() -> None:
    assert gpu.datasheet_peak("NVIDIA H200") == 989.0
    assert gpu.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.datasheet_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.datasheet_peak("Some Other Accelerator") is None


def test_qwen2_05b_shape_has_its_non_embedding_parameters() -> None:
    """The full plan's shape, on the meta device (no memory): Qwen2-0.5B's 358M decoder weights
    besides a 151936-row embedding (the published model: 494M with the embedding)."""
    from transformers import Qwen2ForSequenceClassification

    tokenizer = gpu.build_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, 300)
    with gpu.torch.device("meta"):
        model = Qwen2ForSequenceClassification(gpu.qwen2_config(gpu.QWEN2_05B, tokenizer))
    counts = gpu.parameter_counts(model)
    assert counts["vocab"] == 151936
    assert counts["embedding_params"] == 151936 * 896
    assert round(counts["non_embedding_params"] / 1e6) == 358
    assert round((counts["non_embedding_params"] + counts["embedding_params"]) / 1e6) == 494


def test_a_vocab_below_the_tokenizers_is_refused() -> None:
    tokenizer = gpu.build_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, 300)
    shape = gpu.dataclasses.replace(gpu.TINY.shape, vocab=10)
    with pytest.raises(ValueError, match="shape.vocab 10"):
        gpu.qwen2_config(shape, tokenizer)


@pytest.mark.parametrize(("argv", "field"), [(["--device", "tpu"], "--device"),
                                             (["--budget-s", "0"], "--budget-s")])
def test_bad_options_exit_2_naming_the_option(argv: list[str], field: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        gpu.main(argv)
    assert exit_.value.code == 2
    assert field in capsys.readouterr().err


def test_the_wrapper_without_a_step_prints_its_usage() -> None:
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: bench/gpu.sh prepare | run" in proc.stderr
