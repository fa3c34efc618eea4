"""docs/trainers.md names only things that exist: the adapters' imports, TRL's reward-function
keywords and config fields, verl's config keys, OpenRLHF's flags, the CLI's options."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from hero_client._jsonl import build_parser
from hero_client.adapters.openrlhf import openrlhf_args
from support import REPO

DOC = (REPO / "docs" / "trainers.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, flags=re.S)


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
    import verl  # noqa: F401
    from omegaconf import OmegaConf

    import verl

    config = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config"
                            / "_generated_ppo_trainer.yaml")
    overrides = [w for b in blocks("bash") for w in shell_words(b)
                 if re.match(r"^\+?[a-z_]+(\.[a-z_]+)+=", w)]
    assert len(overrides) >= 6
    for override in overrides:
        key, _ = override.split("=", 1)
        if key.startswith("+"):  # hydra: a new key under an existing node
            parent = key[1:].rsplit(".", 2)[0]
            assert OmegaConf.select(config, parent) is not None, parent
        else:
            node, leaf = key.rsplit(".", 1)
            assert leaf in OmegaConf.select(config, node), key
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
