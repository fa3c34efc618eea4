"""docs/trainers.md names only things that exist: the adapters' imports, TRL's reward-function
keywords and config fields, verl's config keys, OpenRLHF's flags, the CLI's options; and its TRL
snippet runs as written on CPU against a live service."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from adapter_support import metric, minilm_chat_tokenizer, tiny_causal_lm
from support import REPO, running_server

from hero_client._score_command import build_parser
from hero_client.adapters.openrlhf import openrlhf_args

DOC = (REPO / "docs" / "trainers.md").read_text()


def blocks(lang: str, section: str = "") -> list[str]:
    text = DOC.split(section, 1)[1].split("\n## ", 1)[0] if section else DOC
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shell_words(block: str) -> list[str]:
    return shlex.split(block.replace("\\\n", " "), comments=True)


def test_trainers_doc_imports_resolve():
    imports = [m for b in blocks("python") + blocks("bash")
               for m in re.finditer(r"^from (hero_client[\w.]*) import ([\w, ]+)", b, flags=re.M)]
    assert len(imports) >= 5
    for m in imports:
        module = importlib.import_module(m.group(1))
        for name in m.group(2).split(","):
            assert hasattr(module, name.strip()), f"{m.group(1)}.{name.strip()}"


def test_trainers_doc_trl_calling_convention_and_config():
    import trl
    source = Path(importlib.import_module("trl.trainer.grpo_trainer").__file__).read_text()
    # the keywords the doc (and HeroRewardFunction.__call__) rely on
    assert "prompts=prompts, completions=completions, completion_ids=completion_ids_list" in source
    for kwarg in ("trainer_state", "log_metric", "log_extra"):
        assert f'reward_kwargs["{kwarg}"]' in source
    assert "get_callable_name" in source  # the name TRL logs a reward function under
    fields = trl.GRPOConfig.__dataclass_fields__
    assert {"num_generations", "scale_rewards"} <= set(fields)
    assert 'self.scale_rewards in ["group", "none"]' in source  # group std computed
    assert 'self.scale_rewards == "batch"' in source  # one std for the whole batch
    assert 'if self.scale_rewards != "none":' in source  # "none": no division at all
    assert fields["scale_rewards"].default == "group"  # the default that cancels w


def test_trainers_doc_verl_config_keys_exist():
    import verl
    from omegaconf import OmegaConf


    config = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config"
                            / "_generated_ppo_trainer.yaml")
    overrides = [w for b in blocks("bash") for w in shell_words(b)
                 if re.match(r"^\+?[a-z_]+(\.[a-z_]+)+=", w)]
    assert len(overrides) >= 6
    for override in overrides:
        key, value = override.split("=", 1)
        if key.startswith("+"):  # hydra: a new key under an existing node
            parent = key[1:].rsplit(".", 2)[0]
            assert OmegaConf.select(config, parent) is not None, parent
        else:
            node, leaf = key.rsplit(".", 1)
            assert leaf in OmegaConf.select(config, node), key
        if value.startswith("${"):  # an interpolation must name a key of verl's config
            assert OmegaConf.select(config, value[2:-1]) is not None, value
    assert OmegaConf.select(config, "algorithm.norm_adv_by_std_in_grpo") is True  # cancels w
    assert OmegaConf.select(config, "reward.reward_manager.name") == "naive"
    rollout = (Path(verl.__file__).parent / "trainer" / "ppo" / "ray_trainer.py").read_text()
    assert "actor_rollout_ref.rollout.n" in rollout


def test_trainers_doc_openrlhf_flags_exist():
    import openrlhf
    source = (Path(openrlhf.__file__).parent / "cli" / "train_ppo_ray.py").read_text()
    words = [w for b in blocks("bash") if "openrlhf" in b for w in shell_words(b)]
    flags = [w for w in words if w.startswith("--") and "." in w]
    assert flags == openrlhf_args("http://HOST:8000", 8, label_key="answer")[::2]
    for flag in flags:
        assert f'"{flag}"' in source, flag
    for estimator in ("rloo", "dr_grpo", "reinforce_baseline", "group_norm"):
        assert f'"{estimator}"' in source


def test_trainers_doc_cli_options_exist():
    options = {o for a in build_parser()._actions for o in a.option_strings}
    used = [w for b in blocks("bash") if "hero-rewards score" in b for w in shell_words(b)
            if w.startswith("-")]
    assert used and set(used) <= options, set(used) - options


def tiny_policy_dir(path: Path) -> Path:
    """A model directory for GRPOTrainer(model=PATH): a tiny random Llama over MiniLM's
    tokenizer (nothing downloaded). Its generation config biases EOS so completions stay a few
    tokens long (the snippet keeps TRL's default max_completion_length of 512)."""
    tokenizer = minilm_chat_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_input_names"] = tokenizer.model_input_names  # save_pretrained drops it
    config_file.write_text(json.dumps(config))
    generation = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                  "sequence_bias": [[[tokenizer.eos_token_id], 9.0]]}
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_trainers_doc_trl_snippet_runs_as_written_on_cpu(tmp_path):
    code = blocks("python", "## TRL")[0]
    model, url = "Qwen/Qwen2.5-0.5B-Instruct", "http://127.0.0.1:8000"
    assert f'model="{model}"' in code and f'"{url}"' in code and "trainer.train()" in code
    policy = tiny_policy_dir(tmp_path / "policy")
    report = tmp_path / "report.json"
    probe = f"""
import json, pathlib
logs = [log for log in trainer.state.log_history if "rewards/hero/mean" in log]
pathlib.Path({str(report)!r}).write_text(json.dumps({{
    "steps": trainer.state.global_step, "calls": reward.calls,
    "rewards": [log["rewards/hero/mean"] for log in logs],
    "weights": [log["hero/weight"] for log in logs]}}))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with running_server("--verifier-workers", "1") as hero:
        # only the model name and the URL change; everything else runs as the doc writes it
        script = code.replace(model, str(policy)).replace(url, hero.url) + probe
        scored_before = metric(hero.url, "hero_rollouts_scored_total", 'mode="hero"')
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        scored = metric(hero.url, "hero_rollouts_scored_total", 'mode="hero"') - scored_before
    got = json.loads(report.read_text())
    # TRL's defaults: 3 epochs of one prompt x 8 generations = 3 steps, each scored by the service
    assert got["steps"] == 3 and got["calls"] == 3 and scored == 24
    assert len(got["rewards"]) >= 1 and all(math.isfinite(r) for r in got["rewards"])
    assert all(0.4 <= w <= 3.0 for w in got["weights"])
