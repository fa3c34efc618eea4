#!/usr/bin/env python
"""Prompt sharing (issue 13 item 1): a group's rendered prompt encoded once, measured on CPU.

    .venv/bin/python bench/shared_prompt.py            # the section alone (~2 min on 2 cores)
    .venv/bin/python bench/shared_prompt.py --quick    # smoke version (seconds)

``bench/run.py`` runs the same section (``measure``) and prints its rows and targets.

The RM is a random Qwen2-shaped sequence classifier built from a config (no download; MiniLM's
WordPiece tokenizer from the embedded-model package carrying Qwen2.5's ChatML template from TRL),
saved to a temporary directory and loaded through ``load_reward_model("hf:...")`` twice: with
prompt sharing (the default) and with ``share_prompts=False``.

Workloads, from the dev rollouts:

* **long shared prompts**: a few-shot block (worked dev problems, ~500 tokens) before each dev
  problem, 8 responses per group of ~300 tokens each (a dev response, concatenated with the next
  ones of its group when shorter, cut to its last ~300 tokens so the answer stays).
* **dev data as is**: the dev groups with their own (short) prompts.

Arms, interleaved over rounds (each round runs every arm once, the order reversed every other
round, so drift on a shared machine cancels):

* **bare per-text forward**: the full texts pre-tokenized, sorted by length, batches of 8,
  ``forward`` of the unshared model back to back on a thread of its own (the per-text limit: no
  batcher, no encoding; a thread like the service's inference thread, see ``bare_forward``).
* **service, sharing on / off**: the real :class:`Batcher` (the service's CPU token budget) fed
  by 4 concurrent callers, one group per request, each encoding its group in a thread as the
  pipeline does (tokenization is on the clock).

Scores of every arm are compared per rollout with the bare forward's."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from machine import progress_log  # noqa: E402
from plan import FULL, QUICK, ModelShape, SharedPromptPlan  # noqa: E402
from targets import AT_MOST, target, target_lines  # noqa: E402
from workload import letters, load_rows  # noqa: E402

log = progress_log("shared-prompt")

GROUP_SIZE = 8
BARE_BATCH = 8
CALLERS = 4
MAX_POSITIONS = 4096


# -- the model ----------------------------------------------------------------------------------


def build_model(path: Path, shape: ModelShape, seed: int = 0) -> Path:
    """A random Qwen2ForSequenceClassification (1 label) with a ChatML-templated tokenizer."""
    import importlib.resources

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from hero_service.reward_models.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    templates = Path(str(importlib.resources.files("trl"))) / "chat_templates"
    tokenizer.chat_template = (templates / "qwen2_5.jinja").read_text()
    tokenizer.eos_token = "[SEP]"
    tokenizer.model_max_length = MAX_POSITIONS  # MiniLM's own 512 would truncate every text
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=MAX_POSITIONS, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForSequenceClassification(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parameters(model: Any) -> int:
    return sum(p.numel() for p in model.model.parameters())


# -- the workloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    prompt: list[dict[str, str]]
    responses: tuple[str, ...]


def _last_tokens(tokenizer: Any, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return str(tokenizer.decode(ids[-n:]))


def few_shot_block(tokenizer: Any, rows: Sequence[dict], n_tokens: int) -> str:
    """Worked problems (a problem and its first correct response), whole, until ~n_tokens."""
    parts: list[str] = []
    used = 0
    for row in rows:
        correct = [r for r, ok in zip(row["responses"], row["grader_correct"]) if ok]
        if not correct:
            continue
        part = f"Problem: {row['prompt']}\nSolution: {correct[0]}\n\n"
        parts.append(part)
        used += len(tokenizer(part, add_special_tokens=False)["input_ids"])
        if used >= n_tokens:
            break
    block = "".join(parts)
    ids = tokenizer(block, add_special_tokens=False)["input_ids"]
    return str(tokenizer.decode(ids[:n_tokens])) + "\n\n"


def long_prompt_groups(tokenizer: Any, rows: Sequence[dict], plan: SharedPromptPlan) -> list[Group]:
    """The few-shot block (from the rows after the measured ones) before each measured problem;
    8 responses of ~``response_tokens`` each, tagged so none is a duplicate."""
    measured = rows[:plan.long_groups]
    block = few_shot_block(tokenizer, rows[plan.long_groups:], plan.few_shot_tokens)
    groups = []
    tag = 0
    for row in measured:
        responses = []
        pool = list(row["responses"])
        for i in range(GROUP_SIZE):
            text = pool[i % len(pool)]
            j = i + 1
            while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < \
                    plan.response_tokens:
                text = text + "\n" + pool[j % len(pool)]
                j += 1
            responses.append(f"(rollout {letters(tag)}) "
                             + _last_tokens(tokenizer, text, plan.response_tokens))
            tag += 1
        prompt = [{"role": "system", "content": row["system"]},
                  {"role": "user", "content": block + "Problem: " + row["prompt"]}]
        groups.append(Group(prompt, tuple(responses)))
    return groups


def dev_groups(rows: Sequence[dict], n: int) -> list[Group]:
    """``n`` dev groups as they are (short prompts), evenly spaced over the file so their
    lengths are typical of it, responses tagged so none is a duplicate."""
    groups = []
    tag = 0
    for row in (rows[i * len(rows) // n] for i in range(n)):
        responses = []
        for response in row["responses"]:
            responses.append(f"(rollout {letters(tag)}) {response}")
            tag += 1
        groups.append(Group([{"role": "system", "content": row["system"]},
                             {"role": "user", "content": row["prompt"]}], tuple(responses)))
    return groups


# -- the arms -----------------------------------------------------------------------------------


def scoring_items(groups: Sequence[Group]) -> list[list[Any]]:
    from hero_service.reward_models import ScoringItem

    return [[ScoringItem(g.prompt, r) for r in g.responses] for g in groups]


@dataclass
class ArmRun:
    seconds: float
    scores: dict[Any, float]  # by the item's key
    forwards: int = 0
    computed_tokens: int = 0  # what the forwards cost, as the batcher counts it (padded)


def bare_forward(model: Any, groups: Sequence[Group]) -> Callable[[], ArmRun]:
    """The full texts pre-tokenized (off the clock), sorted by length, batches of 8."""
    encoded = sorted((e for items in scoring_items(groups) for e in model.encode(items)),
                     key=lambda e: e.n_tokens)
    batches = [encoded[i:i + BARE_BATCH] for i in range(0, len(encoded), BARE_BATCH)]

    def forward_all(scores: dict[Any, float]) -> None:
        for batch in batches:
            scores.update(zip((e.key for e in batch), model.forward(batch)))

    def run() -> ArmRun:
        # On a thread of its own, as the service's forwards run on its inference thread: on this
        # loaded 2-core machine the same forwards ran 3-10x slower on the main thread.
        scores: dict[Any, float] = {}
        started = time.perf_counter()
        worker = threading.Thread(target=forward_all, args=(scores,), name="bare-forward")
        worker.start()
        worker.join()
        if len(scores) != sum(len(b) for b in batches):
            raise RuntimeError("the bare forward failed (see its thread's traceback above)")
        return ArmRun(time.perf_counter() - started, scores, len(batches),
                      sum(max(e.n_tokens for e in b) * len(b) for b in batches))

    return run


class _Counting:
    """Counts the forwards of the model it wraps and what the batcher charged for them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.forwards = 0
        self.tokens = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def forward(self, batch: Sequence[Any]) -> list[float]:
        from hero_service.batching import batch_cost

        self.forwards += 1
        self.tokens += batch_cost(batch, padded=self.model.padded,
                                  shares_prefixes=self.model.shares_prefixes)
        return list(self.model.forward(batch))


def through_batcher(model: Any, groups: Sequence[Group],
                    max_batch_tokens: int) -> Callable[[], ArmRun]:
    """The real batcher, 4 concurrent callers, one group per request, encoding on the clock."""
    requests = scoring_items(groups)

    def run() -> ArmRun:
        from rm_stage import score_through_batcher

        counting = _Counting(model)
        started = time.perf_counter()
        scores, _ = score_through_batcher(counting, requests, CALLERS, max_batch_tokens)
        return ArmRun(time.perf_counter() - started, scores, counting.forwards, counting.tokens)

    return run


def interleaved(arms: dict[str, Callable[[], ArmRun]], rounds: int) -> dict[str, list[ArmRun]]:
    """Every arm once per round, the order reversed every other round."""
    runs: dict[str, list[ArmRun]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            run = arms[name]()
            runs[name].append(run)
            log(f"  round {r + 1}: {name} {run.seconds:.2f}s, {run.forwards} forwards")
    return runs


def summary(runs: list[ArmRun], rollouts: int, reference: list[ArmRun]) -> dict[str, Any]:
    """An arm's figures; ``x_reference``: its speed over the reference arm's in each round (the
    two side by side), the median round."""
    seconds = [r.seconds for r in runs]
    want = reference[0].scores
    return {
        "rollouts": rollouts, "seconds": [round(s, 3) for s in seconds],
        "rollouts_per_s": round(rollouts / statistics.mean(seconds), 3),
        "x_reference": round(statistics.median(
            ref.seconds / run.seconds for ref, run in zip(reference, runs)), 4),
        "forwards": runs[0].forwards, "computed_tokens": runs[0].computed_tokens,
        "max_abs_score_diff": max(abs(run.scores[k] - want[k]) for run in runs for k in want)}


def measure(plan: SharedPromptPlan, data: Optional[Path] = None) -> dict[str, Any]:
    """The section's results (``bench/run.py`` keeps them under ``shared_prompt``)."""
    from hero_service.reward_models import load_reward_model

    rows = load_rows(data)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hero-shared-prompt-rm-") as tmp:
        path = build_model(Path(tmp) / "rm", plan.model)
        sharing = load_reward_model(f"hf:{path}", device="cpu")
        unshared = load_reward_model(f"hf:{path}", device="cpu", share_prompts=False)
    assert sharing.shares_prefixes and not unshared.shares_prefixes
    tokenizer = sharing.tokenizer  # type: ignore[attr-defined]
    out: dict[str, Any] = {
        "plan": asdict(plan), "model_parameters": parameters(sharing),
        "group_size": GROUP_SIZE, "callers": CALLERS, "bare_batch": BARE_BATCH}
    # The long prompts against the bare forward; the dev data as is, sharing on against off.
    for name, groups, with_bare in (
            ("long", long_prompt_groups(tokenizer, rows, plan), True),
            ("dev", dev_groups(rows, plan.dev_groups), False)):
        encoded = [e for items in scoring_items(groups) for e in sharing.encode(items)]
        prefixes = [e.shared_prefix.n_tokens for e in encoded if e.shared_prefix]
        workload = {
            "groups": len(groups), "rollouts": len(encoded),
            "tokens_per_rollout": round(statistics.mean(e.n_tokens for e in encoded), 1),
            "prompt_tokens": round(statistics.mean(prefixes), 1) if prefixes else 0.0,
            "shared_fraction": round(len(prefixes) / len(encoded), 3),
            "truncated": sum(e.truncated for e in encoded)}
        log(f"{name}: {workload}")
        arms: dict[str, Callable[[], ArmRun]] = {}
        if with_bare:
            arms["bare"] = bare_forward(unshared, groups)
        arms["service_sharing"] = through_batcher(sharing, groups, plan.max_batch_tokens)
        arms["service_unshared"] = through_batcher(unshared, groups, plan.max_batch_tokens)
        # Off the clock: the first forwards of each model allocate their working memory.
        for model in (sharing, unshared):
            model.forward(model.encode(scoring_items(groups[:1])[0]))
        runs = interleaved(arms, plan.rounds)
        reference = "bare" if with_bare else "service_unshared"
        result: dict[str, Any] = {
            "workload": workload, "reference": reference,
            "arms": {arm: summary(r, len(encoded), runs[reference]) for arm, r in runs.items()},
            "scores_std": round(statistics.pstdev(runs[reference][0].scores.values()), 6)}
        out[name] = result
    out["duration_s"] = round(time.perf_counter() - started, 1)
    out["targets"] = targets(out)
    return out


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    long, dev = r["long"], r["dev"]
    worst = max(arm["max_abs_score_diff"] for x in (long, dev) for arm in x["arms"].values())
    return [
        target("shared prompts (~500-token few-shot, 8 x ~300): service / bare forward",
               long["arms"]["service_sharing"]["x_reference"], 1.5, ">= 1.5"),
        target("dev data as is: service sharing on / sharing off",
               dev["arms"]["service_sharing"]["x_reference"], 0.95, ">= 0.95"),
        target("shared prompts: max |score - the reference arm's score|", worst, 1e-3,
               "<= 1e-3", AT_MOST),
    ]


# -- the table ----------------------------------------------------------------------------------


LABELS = {"bare": "bare per-text forward, sorted batches of {bare_batch}",
          "service_sharing": "service (batcher), prompt sharing on",
          "service_unshared": "service (batcher), prompt sharing off"}


def rows(r: dict[str, Any], name_width: int) -> list[str]:
    """The section's lines in ``make bench``'s table."""
    shape = r["plan"]["model"]
    lines = [f"shared prompts (random Qwen2-shaped RM: hidden {shape['hidden']}, "
             f"{shape['layers']} layers, {r['model_parameters'] / 1e6:.1f}M decoder params, "
             f"fp32 on CPU; service = the real Batcher, {r['callers']} callers x 1 group per "
             f"request, budget {r['plan']['max_batch_tokens']}; rounds "
             f"{r['plan']['rounds']}, interleaved):"]
    for workload in ("long", "dev"):
        x = r[workload]
        w = x["workload"]
        reference = x["reference"]
        lines.append(f"  {workload} ({w['groups']} groups x {r['group_size']}, "
                     f"{w['tokens_per_rollout']:.0f} tokens/rollout of which prompt "
                     f"{w['prompt_tokens']:.0f}, shared by {w['shared_fraction']:.0%}):")
        for arm, a in x["arms"].items():
            label = LABELS[arm].format(bare_batch=r["bare_batch"])
            diff = (f", max |score diff| {a['max_abs_score_diff']:.1e} (scores' std "
                    f"{x['scores_std']:.3f})" if arm != reference else "")
            lines.append(f"    {label:<{name_width - 4}} {a['rollouts_per_s']:>7.2f} rollouts/s"
                         f"  x {reference.removeprefix('service_')} {a['x_reference']:.2f}  "
                         f"({a['forwards']} forwards, {a['computed_tokens']} tokens{diff})")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="prompt sharing benchmark (bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="smoke version (seconds)")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--data", default=None, help="rollouts JSONL (default: the dev data)")
    args = parser.parse_args(argv)
    result = measure((QUICK if args.quick else FULL).shared_prompt,
                     Path(args.data) if args.data else None)
    text = "\n".join([*rows(result, 58), "",
                      *target_lines(result["targets"], name_width=62, value_width=8)])
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_prompt.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "shared_prompt.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
