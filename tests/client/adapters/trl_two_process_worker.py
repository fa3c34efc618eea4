"""One process of a multi-process ``trl.GRPOTrainer`` run (launched by torchrun from
test_trl_multiprocess.py): a tiny random policy on CPU (gloo), HERO rewards from a live service.
Writes what its reward function saw and returned, per call, to ``<out>/rank<RANK>.json``.

    torchrun --nproc_per_node 2 trl_two_process_worker.py URL API_KEY DATASET.json OUT_DIR RUN
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # adapter_support, support (as pytest sees them)

from adapter_support import minilm_chat_tokenizer, tiny_causal_lm

from hero_client.adapters.trl import HeroRewardFunction

PER_DEVICE_BATCH = 3  # with 2 processes and num_generations=2: the middle group is cut
NUM_GENERATIONS = 2


class RecordingReward:
    """The adapter as TRL calls it, keeping each call's inputs, outputs and service answer."""

    def __init__(self, reward: HeroRewardFunction) -> None:
        self.reward = reward
        self.__name__ = reward.__name__
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        out = self.reward(prompts=prompts, completions=completions, **kwargs)
        response = self.reward.last_response
        assert response is not None
        self.calls.append({
            "global_step": kwargs["trainer_state"].global_step,
            "prompts": [p[0]["content"] for p in prompts],
            "completions": [c[0]["content"] for c in completions],
            "answers": list(kwargs["answer"]),
            "rewards": out,
            "sigma_ref": response.sigma_ref,
            "groups": [g.model_dump(mode="json") for g in response.groups],
        })
        return out


def main(url: str, api_key: str, dataset_path: str, out_dir: str, run: str) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rank = int(os.environ["RANK"])
    rows = json.loads(Path(dataset_path).read_text())
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "answer": r["reference"]} for r in rows])
    reward = RecordingReward(HeroRewardFunction(url, api_key=api_key, run=run,
                                                num_generations=NUM_GENERATIONS, timeout=60.0))
    tokenizer = minilm_chat_tokenizer()
    config = GRPOConfig(
        output_dir=str(Path(out_dir) / "grpo"), per_device_train_batch_size=PER_DEVICE_BATCH,
        num_generations=NUM_GENERATIONS, max_completion_length=8, max_steps=2,
        logging_steps=1, learning_rate=1e-3, beta=0.0, report_to="none", use_cpu=True,
        bf16=False, save_strategy="no", seed=0, scale_rewards="batch",
        ddp_backend="gloo", dataloader_num_workers=0)
    trainer = GRPOTrainer(model=tiny_causal_lm(tokenizer), reward_funcs=reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    logged = trainer._logs  # TRL gathers the last generation batch of all processes here
    record = {
        "rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
        "global_step": trainer.state.global_step, "calls": reward.calls,
        "client_sigma_ref": reward.reward.running_sigma.value,
        "gathered_rewards": [float(x) for x in logged["rewards"][reward.__name__]],
        "gathered_prompts": [p[0]["content"] for p in logged["prompt"]],
        "gathered_completions": [c[0]["content"] for c in logged["completion"]],
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:6])
