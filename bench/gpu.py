#!/usr/bin/env python
"""The GPU benchmark (issue 13 item 4): a Qwen2-0.5B-shaped reward model on one GPU, every
scoring path side by side on the same rollouts, tokens/s and model FLOP utilisation, and an
out-of-memory split provoked on purpose.

    bench/gpu.sh prepare                  # here: the dev data and the wheels the device lacks
    bench/gpu.sh run                      # on the device machine (bench/README.md, "GPU")
    .venv/bin/python bench/gpu.py --tiny --device cpu   # the same code, tiny, on CPU (< 1 min)

Nothing is downloaded. The RM is a ``Qwen2ForSequenceClassification`` built from a config with
random weights (Qwen2-0.5B's shape: hidden 896, 24 layers, 14 query / 2 KV heads, MLP 4864,
vocab 151936), saved to a temporary directory and loaded through the service's own
``load_reward_model("hf:...")`` twice: prompt sharing on (the default) and off. Its tokenizer is
a byte-level BPE trained here on the dev rollouts (a second or two), with Qwen's ChatML
template; only its first ``tokenizer_vocab`` ids occur, the rest of the embedding rows are there
for the shape (an embedding lookup costs no FLOPs).

Workloads, from the dev rollouts (``--data``): **dev** — the dev groups with their own prompts,
8 responses each of 1-2k tokens (a dev response followed by the next ones of its group until
long enough, cut to its last n tokens so the boxed answer stays); **long** — the same kind of
responses under a ~1000-token few-shot prompt (worked dev problems), where sharing has most to
save.

Arms, every one once per round, the order reversed every other round:

* **bare forward**: the full texts pre-tokenized off the clock, length-sorted and packed by the
  service's rule (``pack_batches``) within the service's GPU budget (16384 tokens), and within 4x
  it; ``forward`` of the unshared model back to back.
* **service, grouped / per-sample, sharing on / off**: the real :class:`Batcher` (the service's
  budget and wait) fed by concurrent callers doing what the pipeline's RM stage does per request
  (announce, ``encode`` in a worker thread, withdraw, ``batcher.score``): 16 callers x one group
  of 8 per request, or 64 callers x one response (OpenRLHF's pattern). In-process: no HTTP, no
  verifier (the device image has no FastAPI, uvicorn or math-verify).
* **naive per-sample**: what ``naive_server.py``'s handler does for the RM, one response after
  the other: ``encode`` + ``forward`` on a batch of one (unshared, as OpenRLHF's serve_rm).
* **TRL-style**: group after group in dataset order, ``encode`` + ``forward`` on unsorted
  batches of 8 (the RM half of ``arms.trl_style``; no verifier).

Figures per arm: rollouts/s and tokens/s (the full texts' tokens, the same for every arm of a
workload), ``x bare``, the tokens the forwards really computed (a shared prompt once, no
padding), model FLOP utilisation = 2 x non-embedding parameters x computed tokens / time over
the chip's bf16 dense peak (a small table by device name) and over an 8192^3 bf16 matmul
measured at the start, peak GPU memory, and every score against the bare forward's.

**Out-of-memory split**: every dev rollout in ONE forced batch (an unbounded token budget) under
a memory cap (``torch.cuda.set_per_process_memory_fraction``: the real allocator raises the real
``torch.OutOfMemoryError``; on CPU, where no allocator cap exists, a stand-in raises it past a
token count), through the real Batcher: it must split and still score every rollout as batches
of 4 do.

Writes ``gpu.json`` (every figure, per round) and ``gpu.txt`` (the table) to ``--results-dir``
(default ``$OUT`` where set: the device tool brings back what is written there), after every
section, so a run stopped early still leaves its results."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
# A source tree with nothing installed (the device machine): the service and client from here.
for source in (REPO / "service", REPO / "clients" / "python"):
    if str(source) not in sys.path:
        sys.path.append(str(source))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from machine import cpu_model, git_commit, progress_log  # noqa: E402
from metrics import total  # noqa: E402
from rm_stage import Delegating, score_through_batcher  # noqa: E402
from shared_prompt import few_shot_block  # noqa: E402
from targets import AT_MOST, target, target_lines  # noqa: E402
from workload import letters, load_rows  # noqa: E402

from hero_service.batching import Batcher, batch_cost, pack_batches  # noqa: E402
from hero_service.metrics import Metrics  # noqa: E402
from hero_service.reward_models import (  # noqa: E402
    Encoded,
    RewardModel,
    ScoringItem,
    load_reward_model,
)
from hero_service.reward_models.hf import HFRewardModel  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = progress_log("gpu")
T = TypeVar("T")

GROUP_SIZE = 8
TRL_BATCH = 8
REFERENCE_BATCH = 4  # the "small batches" the OOM split's scores are checked against
MAX_POSITIONS = 4096  # every text here fits: nothing is truncated
CHATML = (  # Qwen2's chat template, reduced to what the RM renders (no tools)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# bf16 dense matrix peak by device name (vendor datasheets, TFLOP/s, without sparsity); the
# first name contained in torch's device name wins, so the longer names come first.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0),
                    ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # 0: the tokenizer's own size


@dataclass(frozen=True)
class GpuPlan:
    name: str
    shape: Shape
    tokenizer_vocab: int
    dev_groups: int               # spread evenly over the file
    long_groups: int              # the first rows; the few-shot block comes from later ones
    response_tokens: tuple[int, int]  # each response's length, drawn uniformly in this range
    few_shot_tokens: int
    rounds: int
    max_batch_tokens: int         # the service's budget (its GPU default in the full plan)
    grouped_callers: int
    per_sample_callers: int
    oom_cap_mb: int               # on GPU: memory allowed above what the process holds
    oom_cpu_cap_tokens: int       # on CPU: the stand-in's limit (padded tokens per forward)
    matmul_n: int
    budget_s: float               # soft: later rounds are skipped past fractions of it


QWEN2_05B = Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
FULL = GpuPlan("full", QWEN2_05B, tokenizer_vocab=16384, dev_groups=50, long_groups=16,
               response_tokens=(1024, 2048), few_shot_tokens=1000, rounds=5,
               max_batch_tokens=16384, grouped_callers=16, per_sample_callers=64,
               oom_cap_mb=4096, oom_cpu_cap_tokens=65536, matmul_n=8192, budget_s=330.0)
TINY = GpuPlan("tiny", Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=0),
               tokenizer_vocab=1024, dev_groups=2, long_groups=2, response_tokens=(48, 96),
               few_shot_tokens=64, rounds=2, max_batch_tokens=1024, grouped_callers=2,
               per_sample_callers=8, oom_cap_mb=64, oom_cpu_cap_tokens=600, matmul_n=512,
               budget_s=90.0)


# -- the model ----------------------------------------------------------------------------------


def build_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` (offline, seconds) with ChatML's special tokens:
    ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn, as Qwen2's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    # model_max_length stays unset: the config's MAX_POSITIONS is the service's limit.
    return tokenizer


def qwen2_config(shape: Shape, tokenizer: PreTrainedTokenizerFast) -> Any:
    """A Qwen2 sequence-classifier config (1 label) of ``shape`` for ``tokenizer``'s ids."""
    from transformers import Qwen2Config

    vocab = shape.vocab or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"shape.vocab {vocab} is below the tokenizer's {len(tokenizer)} ids")
    # num_labels is a PretrainedConfig keyword that Qwen2Config's typed signature leaves out.
    return Qwen2Config(  # type: ignore[call-arg]
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def parameter_counts(model: Any) -> dict[str, int]:
    embedding = model.model.embed_tokens.weight.numel()
    return {"vocab": model.config.vocab_size, "embedding_params": embedding,
            # What a token's forward multiplies by: the decoder's weights and the score head.
            "non_embedding_params": sum(p.numel() for p in model.parameters()) - embedding}


def build_model(path: Path, shape: Shape, tokenizer: PreTrainedTokenizerFast,
                dtype: torch.dtype, seed: int = 0) -> dict[str, int]:
    """A random Qwen2ForSequenceClassification and its tokenizer, saved to ``path`` in the
    dtype the service will load it in; returns its parameter counts."""
    from transformers import Qwen2ForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the device's output tail is for the table
    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification(qwen2_config(shape, tokenizer)).eval().to(dtype)
    counts = parameter_counts(model)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return counts


# -- the workloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    prompt: list[dict[str, str]]
    responses: tuple[str, ...]

    def items(self) -> list[ScoringItem]:
        return [ScoringItem(self.prompt, r) for r in self.responses]


def n_tokens(tokenizer: PreTrainedTokenizerFast, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sized_response(tokenizer: PreTrainedTokenizerFast, pool: Sequence[str], start: int,
                   length: int) -> str:
    """Response ``start`` of a group followed by the group's next ones (cyclically) until it
    has ``length`` tokens, cut to its last ``length`` (the end, with the final answer, stays)."""
    text = pool[start % len(pool)]
    for j in range(start + 1, start + 1 + 64 * len(pool)):
        if n_tokens(tokenizer, text) >= length:
            break
        text = text + "\n\n" + pool[j % len(pool)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"a group's responses give {len(ids)} tokens, below {length}")
    return str(tokenizer.decode(ids[-length:]))


def build_groups(tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict],
                 plan: GpuPlan, prefix: str, rng: random.Random, tag0: int) -> list[Group]:
    """One group per row: ``prefix`` before the row's problem, 8 responses of 1-2k tokens,
    each tagged (``(rollout ab)``) so none is a duplicate the batcher would score once."""
    groups = []
    tag = tag0
    for row in rows:
        responses = []
        for i in range(GROUP_SIZE):
            length = rng.randint(*plan.response_tokens)
            body = sized_response(tokenizer, row["responses"], i, length)
            responses.append(f"(rollout {letters(tag)}) {body}")
            tag += 1
        groups.append(Group([{"role": "system", "content": row["system"]},
                             {"role": "user", "content": prefix + row["prompt"]}],
                            tuple(responses)))
    return groups


def workloads(tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict],
              plan: GpuPlan) -> dict[str, list[Group]]:
    rng = random.Random(0)
    dev_rows = [rows[i * len(rows) // plan.dev_groups] for i in range(plan.dev_groups)]
    dev = build_groups(tokenizer, dev_rows, plan, "", rng, 0)
    block = few_shot_block(tokenizer, rows[plan.long_groups:], plan.few_shot_tokens)
    long = build_groups(tokenizer, rows[:plan.long_groups], plan, block + "Problem: ", rng,
                        GROUP_SIZE * len(dev))
    return {"dev": dev, "long": long}


def describe(model: RewardModel, groups: Sequence[Group]) -> dict[str, Any]:
    encoded = [e for g in groups for e in model.encode(g.items())]
    if len({e.key for e in encoded}) != len(encoded):
        raise ValueError("the workload has duplicate rollouts: the batcher would score them once")
    prefixes = [e.shared_prefix.n_tokens for e in encoded if e.shared_prefix]
    lengths = [e.n_tokens for e in encoded]
    return {"groups": len(groups), "rollouts": len(encoded), "tokens": sum(lengths),
            "tokens_per_rollout": round(statistics.mean(lengths), 1),
            "min_tokens": min(lengths), "max_tokens": max(lengths),
            "prompt_tokens": round(statistics.mean(prefixes), 1) if prefixes else 0.0,
            "shared_fraction": round(len(prefixes) / len(encoded), 3),
            "truncated": sum(e.truncated for e in encoded)}


# -- the arms -----------------------------------------------------------------------------------


class Counted(Delegating):
    """Delegates to ``inner``, counting its forwards and what they computed: ``computed`` the
    real tokens (a shared prefix once, no padding), ``padded`` what the batcher charged; with a
    CUDA ``device``, the memory allocated as each attempt starts (what earlier ones left)."""

    def __init__(self, inner: RewardModel, device: Optional[torch.device] = None) -> None:
        super().__init__(inner)
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.forwards = 0
        self.computed = 0
        self.padded_tokens = 0
        self.failed_sizes: list[int] = []
        self.sizes: list[int] = []
        self.attempts: list[dict[str, Any]] = []

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        attempt: dict[str, Any] = {"size": len(batch), "ok": False}
        if self.cuda is not None:
            attempt["allocated_mb"] = round(torch.cuda.memory_allocated(self.cuda) / 2**20)
        self.attempts.append(attempt)
        try:
            scores = self.inner.forward(batch)
        except Exception:
            self.failed_sizes.append(len(batch))
            raise
        attempt["ok"] = True
        self.forwards += 1
        self.sizes.append(len(batch))
        self.computed += batch_cost(batch, padded=False, shares_prefixes=self.shares_prefixes)
        self.padded_tokens += batch_cost(batch, padded=self.padded,
                                         shares_prefixes=self.shares_prefixes)
        return scores


@dataclass
class ArmRun:
    seconds: float
    scores: dict[Hashable, float]
    forwards: int
    computed_tokens: int
    padded_tokens: int
    peak_memory_mb: Optional[float]


def on_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own, as the service's forwards run on its inference thread
    (on a loaded CPU the same forwards ran 3-10x slower on the main thread: README)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target_() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=target_, name="gpu-bench-arm")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return out[0]


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[Optional[float]]]:
    """Yields a list that holds the peak GPU memory (MB) allocated inside the block."""
    peak: list[Optional[float]] = [None]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield peak
    if device.type == "cuda":
        peak[0] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def timed(model: RewardModel, device: torch.device,
          body: Callable[[Counted], dict[Hashable, float]]) -> ArmRun:
    counted = Counted(model)
    with peak_memory(device) as peak:
        started = time.perf_counter()
        scores = body(counted)
        seconds = time.perf_counter() - started
    return ArmRun(seconds, scores, counted.forwards, counted.computed, counted.padded_tokens,
                  peak[0])


def forward_batches(model: RewardModel, batches: Sequence[Sequence[Encoded]]
                    ) -> dict[Hashable, float]:
    scores: dict[Hashable, float] = {}
    for batch in batches:
        scores.update(zip((e.key for e in batch), model.forward(batch)))
    return scores


def bare_arm(model: RewardModel, groups: Sequence[Group], budget: int,
             device: torch.device) -> Callable[[], ArmRun]:
    """Pre-tokenized off the clock, length-sorted, packed within ``budget``, back to back."""
    encoded = [e for g in groups for e in model.encode(g.items())]
    batches = pack_batches(encoded, budget, padded=model.padded,
                           max_batch_size=model.max_batch_size)
    return lambda: timed(model, device, lambda m: on_thread(lambda: forward_batches(m, batches)))


def naive_arm(model: RewardModel, groups: Sequence[Group],
              device: torch.device) -> Callable[[], ArmRun]:
    """One response after the other: encode, forward a batch of one (naive_server's handler)."""
    items = [item for g in groups for item in g.items()]

    def body(m: Counted) -> dict[Hashable, float]:
        scores: dict[Hashable, float] = {}
        for item in items:
            encoded = m.encode([item])
            scores[encoded[0].key] = m.forward(encoded)[0]
        return scores

    return lambda: timed(model, device, lambda m: on_thread(lambda: body(m)))


def trl_arm(model: RewardModel, groups: Sequence[Group],
            device: torch.device) -> Callable[[], ArmRun]:
    """Group after group in dataset order: encode, forward unsorted batches of 8."""
    def body(m: Counted) -> dict[Hashable, float]:
        scores: dict[Hashable, float] = {}
        for g in groups:
            encoded = m.encode(g.items())
            scores.update(forward_batches(m, [encoded[i:i + TRL_BATCH]
                                              for i in range(0, len(encoded), TRL_BATCH)]))
        return scores

    return lambda: timed(model, device, lambda m: on_thread(lambda: body(m)))


def service_arm(model: RewardModel, groups: Sequence[Group], per_sample: bool, callers: int,
                budget: int, device: torch.device) -> Callable[[], ArmRun]:
    """Grouped: one group per request; per-sample: one response per request, in group order."""
    requests = ([[item] for g in groups for item in g.items()] if per_sample
                else [g.items() for g in groups])
    return lambda: timed(model, device,
                         lambda m: score_through_batcher(m, requests, callers, budget)[0])


def interleaved(arms: dict[str, Callable[[], ArmRun]], rounds: int, stop_after: float,
                errors: dict[str, str]) -> dict[str, list[ArmRun]]:
    """Every arm once per round, the order reversed every other round; no new round once
    ``time.perf_counter()`` passes ``stop_after``. An arm that fails is recorded in ``errors``
    and left out of later rounds (the others go on: a device run is too dear to lose)."""
    runs: dict[str, list[ArmRun]] = {name: [] for name in arms}
    for r in range(rounds):
        if r and time.perf_counter() > stop_after:
            log(f"  time budget: stopping after {r} rounds")
            break
        names = [n for n in arms if n not in errors]
        for name in (names if r % 2 == 0 else names[::-1]):
            try:
                run = arms[name]()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"  {name} FAILED: {errors[name]}")
                continue
            runs[name].append(run)
            log(f"  round {r + 1}: {name} {run.seconds:.2f}s, {run.forwards} forwards")
    return runs


# -- figures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    device: str
    name: str
    dtype: str
    peak_tflops: Optional[float]      # datasheet bf16 dense (None: not in the table / CPU)
    matmul: dict[str, Any] = field(default_factory=dict)  # measured here


def datasheet_peak(name: str) -> Optional[float]:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> dict[str, Any]:
    """A dense n^3 matmul on random data (3 warm-ups, median of 10): the rate to compare with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."),
            "tflops": significant(2 * n**3 / seconds / 1e12)}


def significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (a CPU's TFLOP/s are hundredths)."""
    return float(f"{x:.{digits}g}")


def summary(runs: list[ArmRun], workload: dict[str, Any], reference: list[ArmRun],
            params: int, chip: Chip) -> dict[str, Any]:
    """One arm's figures: rates from its median round; ``x_reference`` the median over rounds of
    the reference arm's time over this arm's (the two measured in the same round)."""
    seconds = statistics.median(r.seconds for r in runs)
    median_run = min(runs, key=lambda r: abs(r.seconds - seconds))
    flops_per_s = 2 * params * median_run.computed_tokens / median_run.seconds
    want = reference[0].scores if reference else {}
    diffs = [abs(run.scores[k] - want[k]) for run in runs for k in want if k in run.scores]
    missing = sum(len(want) - len(want.keys() & run.scores.keys()) for run in runs)
    measured = chip.matmul.get("tflops")
    return {
        "rounds": len(runs), "seconds": [round(r.seconds, 4) for r in runs],
        "rollouts_per_s": round(workload["rollouts"] / seconds, 2),
        "tokens_per_s": round(workload["tokens"] / seconds, 1),
        "x_reference": (round(statistics.median(ref.seconds / run.seconds
                                                for ref, run in zip(reference, runs)), 4)
                        if reference else None),
        "forwards": median_run.forwards,
        "mean_batch": round(workload["rollouts"] / median_run.forwards, 2),
        "computed_tokens": median_run.computed_tokens,
        "padded_tokens": median_run.padded_tokens,
        "model_tflops": significant(flops_per_s / 1e12),
        "mfu_peak": round(flops_per_s / (chip.peak_tflops * 1e12), 4)
        if chip.peak_tflops else None,
        "mfu_measured": round(flops_per_s / (measured * 1e12), 4) if measured else None,
        "peak_memory_mb": max((r.peak_memory_mb for r in runs if r.peak_memory_mb is not None),
                              default=None),
        "max_abs_score_diff": max(diffs) if diffs else None,
        "missing_scores": missing,
    }


def score_tolerance(dtype: torch.dtype, reference: Sequence[float]) -> float:
    """How close two batchings' scores of the same text must be: fp32 1e-4 (the tests' bound);
    bf16 8 steps of its 8-bit mantissa at the largest score (a different batch shape picks
    other kernels, whose bf16 roundings differ and add up over the layers)."""
    if dtype == torch.float32:
        return 1e-4
    return 8 * 2.0**-8 * max(1.0, max(abs(s) for s in reference))


# -- the out-of-memory split --------------------------------------------------------------------


class CpuOutOfMemoryStandIn(Delegating):
    """On CPU no allocator cap exists: past ``cap_tokens`` padded tokens a forward raises the
    same ``torch.OutOfMemoryError`` the CUDA allocator raises, before any work."""

    def __init__(self, inner: RewardModel, cap_tokens: int) -> None:
        super().__init__(inner)
        self.cap_tokens = cap_tokens

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        cost = batch_cost(batch, padded=self.padded, shares_prefixes=self.shares_prefixes)
        if cost > self.cap_tokens:
            raise torch.OutOfMemoryError(
                f"CPU stand-in: {cost} padded tokens over the cap of {self.cap_tokens}")
        return self.inner.forward(batch)


@contextmanager
def cuda_memory_cap(device: torch.device, extra_mb: int) -> Iterator[dict[str, float]]:
    """The caching allocator refuses to hold more than what the process holds now plus
    ``extra_mb`` (``set_per_process_memory_fraction``); lifted on the way out."""
    torch.cuda.empty_cache()
    total_bytes = torch.cuda.get_device_properties(device).total_memory
    held = torch.cuda.memory_reserved(device)
    fraction = min(1.0, (held + extra_mb * 2**20) / total_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield {"held_mb": round(held / 2**20, 1), "cap_mb": round(fraction * total_bytes / 2**20),
               "fraction": round(fraction, 5)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def one_request_outcomes(model: RewardModel, items: list[ScoringItem], budget: int
                         ) -> tuple[list[Encoded], list[Any], Metrics]:
    """One request of ``items`` through a real Batcher as the pipeline's RM stage sends it, each
    item's outcome kept (a score, or the error the batcher gave it) rather than the first
    error raised."""
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=budget, max_wait_ms=5.0, metrics=metrics)
    batcher.start()

    async def request() -> tuple[list[Encoded], list[Any]]:
        batcher.announce(len(items))
        try:
            encoded = await asyncio.to_thread(model.encode, items)
        finally:
            batcher.withdraw(len(items))
        futures = batcher.submit(encoded)
        return encoded, list(await asyncio.gather(*futures, return_exceptions=True))

    try:
        encoded, outcomes = asyncio.run(request())
    finally:
        batcher.stop()
    return encoded, outcomes, metrics


def oom_split(model: RewardModel, groups: Sequence[Group], plan: GpuPlan,
              device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Every rollout in one forced batch under a memory cap, through the real Batcher: it must
    split on out-of-memory and score every rollout as batches of 4 do."""
    encoded = [e for g in groups for e in model.encode(g.items())]
    ordered = pack_batches(encoded, plan.max_batch_tokens, padded=model.padded,
                           shares_prefixes=model.shares_prefixes)
    small = on_thread(lambda: forward_batches(
        model, [encoded[i:i + REFERENCE_BATCH] for i in range(0, len(encoded), REFERENCE_BATCH)]))
    # How far the service's own batching (budget-sized batches) is from batches of 4: the
    # rounding that batch shape alone causes, to read the split's difference against.
    budget = on_thread(lambda: forward_batches(model, ordered))
    forced_tokens = batch_cost(encoded, padded=model.padded, shares_prefixes=model.shares_prefixes)
    items = [item for g in groups for item in g.items()]
    unbounded = 1 << 40  # every item packs into one forward
    started = time.perf_counter()
    if device.type == "cuda":
        counted = Counted(model, device)
        with cuda_memory_cap(device, plan.oom_cap_mb) as cap:
            scored_items, outcomes, metrics = one_request_outcomes(counted, items, unbounded)
        cap_info: dict[str, Any] = {"mechanism": "torch.cuda.set_per_process_memory_fraction",
                                    **cap}
    else:
        counted = Counted(CpuOutOfMemoryStandIn(model, plan.oom_cpu_cap_tokens))
        scored_items, outcomes, metrics = one_request_outcomes(counted, items, unbounded)
        cap_info = {"mechanism": "CPU stand-in raising torch.OutOfMemoryError",
                    "cap_tokens": plan.oom_cpu_cap_tokens}
    seconds = time.perf_counter() - started
    scores = {e.key: o.score for e, o in zip(scored_items, outcomes)
              if not isinstance(o, BaseException)}
    errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    text = metrics.render().decode()
    diffs = [abs(scores[k] - small[k]) for k in small if k in scores]
    tolerance = score_tolerance(dtype, list(small.values()))
    return {
        "rollouts": len(encoded), "forced_batch_padded_tokens": forced_tokens, "cap": cap_info,
        "seconds": round(seconds, 3),
        "oom_splits": total(text, "hero_batch_oom_splits_total"),
        "failed_forward_sizes": counted.failed_sizes,
        "forward_sizes": counted.sizes,
        # In order; on CUDA with the memory allocated as each starts: what failed attempts left.
        "attempts": counted.attempts,
        "scored": len(diffs), "failed": len(errors), "first_errors": errors[:3],
        "max_abs_diff_vs_small_batches": max(diffs) if diffs else None,
        "batching_noise": max(abs(budget[k] - small[k]) for k in small),
        "tolerance": tolerance,
        "ok": len(diffs) == len(encoded) and max(diffs) <= tolerance
        and counted.failed_sizes != [],
    }


# -- the run ------------------------------------------------------------------------------------


def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version(),
                                     "torch": torch.__version__,
                                     "cuda": torch.version.cuda}
    for name in ("transformers", "tokenizers", "pydantic"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


class Run:
    """The run's results, written after every section (a run stopped early keeps them)."""

    def __init__(self, results_dir: Path, result: dict[str, Any]) -> None:
        self.dir = results_dir
        self.result = result

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "gpu.json").write_text(json.dumps(self.result, indent=2) + "\n")
        (self.dir / "gpu.txt").write_text(render(self.result) + "\n")


def measure_workload(name: str, arms: dict[str, Callable[[], ArmRun]], workload: dict[str, Any],
                     plan: GpuPlan, stop_after: float, params: int, chip: Chip
                     ) -> dict[str, Any]:
    errors: dict[str, str] = {}
    log(f"{name}: {workload}")
    runs = interleaved(arms, plan.rounds, stop_after, errors)
    reference = runs.get("bare", [])
    return {
        "workload": workload, "reference": "bare", "errors": errors,
        "arms": {arm: summary(r, workload, reference if arm != "bare" else r, params, chip)
                 for arm, r in runs.items() if r}}


def warm_up(model: RewardModel, groups: Sequence[Group], budget: int) -> None:
    """Off the clock: the first forwards allocate working memory and load the kernels."""
    encoded = [e for g in groups[:2] for e in model.encode(g.items())]
    model.forward(encoded[:1])
    for batch in pack_batches(encoded, budget, padded=model.padded)[:2]:
        model.forward(batch)


def measure(plan: GpuPlan, device_name: str, data: Optional[Path], results_dir: Path,
            commit: Optional[str]) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: error: --device cuda, but torch sees no CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the service's "auto"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    chip = Chip(device_name, name, str(dtype).removeprefix("torch."),
                datasheet_peak(name) if device.type == "cuda" else None,
                matmul_ceiling(device, dtype, plan.matmul_n))
    log(f"{chip.name}: matmul {chip.matmul}, datasheet peak {chip.peak_tflops}")
    rows = load_rows(data)
    result: dict[str, Any] = {
        "meta": {"plan": asdict(plan), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "commit": commit or git_commit(), "versions": versions(),
                 "cpu_cores": os.cpu_count()},
        "chip": asdict(chip)}
    run = Run(results_dir, result)
    run.save()

    corpus = [r for row in rows for r in row["responses"]] + [row["prompt"] for row in rows]
    tokenizer = build_tokenizer(corpus, plan.tokenizer_vocab)
    with tempfile.TemporaryDirectory(prefix="hero-gpu-rm-") as tmp:
        counts = build_model(Path(tmp) / "rm", plan.shape, tokenizer, dtype)
        sharing = load_reward_model(f"hf:{Path(tmp) / 'rm'}", device=device_name)
        unshared = load_reward_model(f"hf:{Path(tmp) / 'rm'}", device=device_name,
                                     share_prompts=False)
    result["model"] = {"shape": asdict(plan.shape), **counts,
                       "tokenizer_ids": len(tokenizer), "shares_prefixes": sharing.shares_prefixes}
    params = counts["non_embedding_params"]
    log(f"model: {result['model']}, built in {time.perf_counter() - started:.1f}s")
    run.save()
    # Lengths in the tokenizer the service loaded (from the Qwen2 config: Qwen2's own
    # pre-tokenizer, digits one by one), not in the one trained above.
    assert isinstance(sharing, HFRewardModel)
    groups = workloads(sharing.tokenizer, rows, plan)
    budget = plan.max_batch_tokens
    # A model whose warm-up fails still runs its arms (each fails alone, recorded): one device
    # run must bring back everything that works.
    warm_up_errors: dict[str, str] = {}
    for label, model in (("sharing", sharing), ("unshared", unshared)):
        try:
            on_thread(functools.partial(warm_up, model, groups["dev"], budget))
        except Exception as exc:
            warm_up_errors[label] = f"{type(exc).__name__}: {exc}"
            log(f"warm-up of the {label} model FAILED: {warm_up_errors[label]}")
    result["warm_up_errors"] = warm_up_errors

    dev = groups["dev"]
    dev_arms: dict[str, Callable[[], ArmRun]] = {
        "bare": bare_arm(unshared, dev, budget, device),
        "bare_4x_budget": bare_arm(unshared, dev, 4 * budget, device),
        "grouped_sharing": service_arm(sharing, dev, False, plan.grouped_callers, budget, device),
        "grouped_unshared": service_arm(unshared, dev, False, plan.grouped_callers, budget,
                                        device),
        "per_sample_sharing": service_arm(sharing, dev, True, plan.per_sample_callers, budget,
                                          device),
        "per_sample_unshared": service_arm(unshared, dev, True, plan.per_sample_callers, budget,
                                           device),
        "naive": naive_arm(unshared, dev, device),
        "trl_style": trl_arm(unshared, dev, device),
    }
    result["dev"] = measure_workload("dev", dev_arms, describe(sharing, dev), plan,
                                     started + 0.55 * plan.budget_s, params, chip)
    run.save()

    log("out-of-memory split")
    try:
        # The service's default (sharing on), unless that model could not even warm up.
        oom_model = unshared if "sharing" in warm_up_errors else sharing
        result["oom"] = oom_split(oom_model, dev, plan, device, dtype)
    except Exception as exc:
        result["oom"] = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
    log(f"  {result['oom']}")
    run.save()

    long = groups["long"]
    long_arms: dict[str, Callable[[], ArmRun]] = {
        "bare": bare_arm(unshared, long, budget, device),
        "grouped_sharing": service_arm(sharing, long, False, plan.grouped_callers, budget,
                                       device),
        "grouped_unshared": service_arm(unshared, long, False, plan.grouped_callers, budget,
                                        device),
    }
    result["long"] = measure_workload("long", long_arms, describe(sharing, long), plan,
                                      started + 0.85 * plan.budget_s, params, chip)
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["targets"] = targets(result)
    run.save()
    return result


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    oom = r["oom"]
    arms_failed = sum(len(r[w]["errors"]) for w in ("dev", "long"))
    every_scored = oom.get("scored") is not None and oom.get("scored") == oom.get("rollouts")
    return [
        target("out-of-memory split: batches split on OOM", oom.get("oom_splits"), 1, ">= 1"),
        # Unmeasured (None, never a pass) unless every rollout came back scored.
        target("out-of-memory split: max |score - batches of 4|",
               oom.get("max_abs_diff_vs_small_batches") if every_scored else None,
               oom.get("tolerance", 0.0),
               f"<= {oom.get('tolerance', 0.0):.2g}, all {oom.get('rollouts', '?')} scored",
               AT_MOST),
        target("arms that failed", arms_failed, 0, "== 0", AT_MOST),
    ]


# -- the table ----------------------------------------------------------------------------------


LABELS = {
    "bare": "bare forward, length-sorted, budget {b}",
    "bare_4x_budget": "bare forward, length-sorted, budget {b4}",
    "grouped_sharing": "service, {g} callers x 1 group, sharing on",
    "grouped_unshared": "service, {g} callers x 1 group, sharing off",
    "per_sample_sharing": "service, {p} callers x 1 response, sharing on",
    "per_sample_unshared": "service, {p} callers x 1 response, sharing off",
    "naive": "naive per-sample: encode + forward batch of 1",
    "trl_style": "TRL-style: per group, unsorted batches of {t}",
}
NAME_WIDTH = 48


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(r: dict[str, Any]) -> str:
    meta, chip, plan = r["meta"], r["chip"], r["meta"]["plan"]
    v = meta["versions"]
    lines = [f"GPU benchmark ({plan['name']}) - {meta['started']} - {chip['name']} "
             f"({chip['device']}, {meta['cpu_cores']} cores); torch {v['torch']} (CUDA "
             f"{v['cuda']}), transformers {v['transformers']}; commit {meta['commit']}; "
             f"{r.get('duration_s', '-')} s"]
    if "model" in r:
        m, s = r["model"], r["model"]["shape"]
        lines.append(
            f"model: random Qwen2ForSequenceClassification, hidden {s['hidden']}, {s['layers']} "
            f"layers, {s['heads']}/{s['kv_heads']} heads, MLP {s['intermediate']}, vocab "
            f"{m['vocab']} (BPE trained on the dev data: {m['tokenizer_ids']} ids used); "
            f"{m['non_embedding_params'] / 1e6:.1f}M non-embedding + "
            f"{m['embedding_params'] / 1e6:.1f}M embedding params, {chip['dtype']}")
    peak = "-" if chip["peak_tflops"] is None else f"{chip['peak_tflops']:.0f}"
    lines.append(f"chip: {chip['dtype']} dense peak {peak} TFLOP/s (datasheet); measured "
                 f"{chip['matmul']['n']}^3 {chip['matmul']['dtype']} matmul "
                 f"{chip['matmul']['tflops']:.3g} TFLOP/s. MFU = 2 x non-embedding params x "
                 "computed tokens / s, over peak / over measured")
    labels = {k: v.format(b=plan["max_batch_tokens"], b4=4 * plan["max_batch_tokens"],
                          g=plan["grouped_callers"], p=plan["per_sample_callers"], t=TRL_BATCH)
              for k, v in LABELS.items()}
    for name in ("dev", "long"):
        if name not in r:
            continue
        x, w = r[name], r[name]["workload"]
        lines += ["", f"{name} ({w['groups']} groups x {GROUP_SIZE}, {w['tokens_per_rollout']:.0f}"
                      f" tokens/rollout ({w['min_tokens']}-{w['max_tokens']}) of which prompt "
                      f"{w['prompt_tokens']:.0f}, shared by {w['shared_fraction']:.0%}; "
                      f"rounds {max((a['rounds'] for a in x['arms'].values()), default=0)}, "
                      "interleaved):",
                  f"  {'arm':<{NAME_WIDTH}} {'rollouts/s':>10} {'tokens/s':>10} {'x bare':>6} "
                  f"{'MFU pk/meas':>13} {'batch':>6} {'computed':>9} {'GPU MB':>7} "
                  f"{'max|d| bare':>11}"]
        for arm, a in x["arms"].items():
            mem = "-" if a["peak_memory_mb"] is None else f"{a['peak_memory_mb']:.0f}"
            diff = ("-" if arm == "bare" or a["max_abs_score_diff"] is None
                    else f"{a['max_abs_score_diff']:.1e}")
            lines.append(
                f"  {labels[arm]:<{NAME_WIDTH}} {a['rollouts_per_s']:>10.1f} "
                f"{a['tokens_per_s']:>10.0f} {_num(a['x_reference']):>6} "
                f"{_pct(a['mfu_peak']):>6}/{_pct(a['mfu_measured']):>6} {a['mean_batch']:>6.1f} "
                f"{a['computed_tokens']:>9} {mem:>7} {diff:>11}")
        arms = x["arms"]
        for pattern in ("grouped", "per_sample"):
            on, off = arms.get(f"{pattern}_sharing"), arms.get(f"{pattern}_unshared")
            if on and off:
                speed = statistics.median(off["seconds"]) / statistics.median(on["seconds"])
                tokens = on["computed_tokens"] / off["computed_tokens"]
                lines.append(f"  {pattern.replace('_', '-')}: sharing on / off {speed:.2f}x "
                             f"rollouts/s, {tokens:.2f}x the computed tokens")
        for arm, error in x["errors"].items():
            lines.append(f"  FAILED {arm}: {error[:300]}")
    for label, error in r.get("warm_up_errors", {}).items():
        lines.append(f"warm-up of the {label} model FAILED: {error[:300]}")
    if "oom" in r:
        o = r["oom"]
        lines.append("")
        if "error" in o:
            lines.append(f"out-of-memory split: FAILED {o['error']}")
        else:
            cap = o["cap"]
            limit = (f"cap {cap['cap_mb']} MB ({cap['held_mb']} MB held + "
                     f"{plan['oom_cap_mb']} MB) via {cap['mechanism']}" if "cap_mb" in cap
                     else f"{cap['mechanism']} past {cap['cap_tokens']} padded tokens")
            lines.append(
                f"out-of-memory split: {o['rollouts']} rollouts forced into one batch "
                f"({o['forced_batch_padded_tokens']} padded tokens), {limit}: "
                f"{o['oom_splits']:.0f} splits; failed forwards "
                f"{_sizes(o['failed_forward_sizes'])}; forwards {_sizes(o['forward_sizes'])}; "
                f"{o['scored']}/{o['rollouts']} scored, "
                f"{o['failed']} failed, in {o['seconds']:.1f}s; max |score - batches of "
                f"{REFERENCE_BATCH}| {_fmt(o['max_abs_diff_vs_small_batches'])} (budget batches "
                f"vs batches of {REFERENCE_BATCH}: {_fmt(o['batching_noise'])}; tolerance "
                f"{o['tolerance']:.2g})")
            held = [a for a in o["attempts"] if "allocated_mb" in a]
            if held:  # what the failed attempts before each one left allocated
                lines.append("  attempts (size: MB allocated as it started, ok/OOM): " + ", ".join(
                    f"{a['size']}: {a['allocated_mb']} {'ok' if a['ok'] else 'OOM'}"
                    for a in held[:12]) + (" ..." if len(held) > 12 else ""))
            if o["first_errors"]:
                lines.append(f"  first error: {o['first_errors'][0][:300]}")
    if "targets" in r:
        lines += ["", *target_lines(r["targets"], name_width=52, value_width=9)]
    return "\n".join(lines)


def _sizes(sizes: Sequence[int]) -> str:
    """Batch sizes as ``size x count``, largest first ("none" for no batch)."""
    counts = {size: sizes.count(size) for size in sorted(set(sizes), reverse=True)}
    return " ".join(f"{size}x{n}" for size, n in counts.items()) or "none"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1e}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark (bench/README.md, 'GPU')")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model and workload: the same code in seconds (CPU smoke)")
    parser.add_argument("--results-dir", default=os.environ.get("OUT") or str(HERE / "results"),
                        help="where gpu.json and gpu.txt go (default $OUT, else bench/results)")
    parser.add_argument("--data", default=None, help="rollouts JSONL (default: the dev data)")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git's)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="soft time bound: later rounds are skipped (default: the plan's)")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device: {args.device!r} is not cpu, cuda or cuda:N")
    plan = TINY if args.tiny else FULL
    if args.budget_s is not None:
        if args.budget_s <= 0:
            parser.error("--budget-s must be positive")
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    result = measure(plan, args.device, Path(args.data) if args.data else None,
                     Path(args.results_dir), args.commit)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
