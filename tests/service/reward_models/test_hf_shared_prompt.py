"""Prompt sharing in the hf backend: a group's rendered prompt encoded once (its keys/values
cached) and every response run on top of it must score exactly what the unshared forward scores
— on a tiny random causal RM saved to disk, directly and through the real batcher — and must
fall back per item wherever sharing would not be exact."""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from chat_template_support import policy_tokenizer, render_prompt
from support import build_tiny_decoder_rm

from hero_service.app import default_reward_model
from hero_service.batching import Batcher, batch_cost, pack_batches
from hero_service.cli import add_settings_arguments, settings_from_args
from hero_service.config import Settings
from hero_service.metrics import Metrics
from hero_service.reward_models import Encoded, ScoringItem, load_reward_model
from hero_service.reward_models.base import SharedPrefix
from hero_service.reward_models.hf import HFRewardModel, prefix_sharing_unsupported

# fp32 on CPU: the shared forward only changes the order of the additions.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_decoder_rm(tmp_path_factory.mktemp("shared-rm"))


def sharing_and_not(path: Path, **options: int) -> tuple[HFRewardModel, HFRewardModel]:
    on = load_reward_model(f"hf:{path}", device="cpu", **options)
    off = load_reward_model(f"hf:{path}", device="cpu", share_prompts=False, **options)
    assert isinstance(on, HFRewardModel) and isinstance(off, HFRewardModel)
    return on, off


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = ["add", "the", "two", "sides", "so", "x", "equals", "seven", "then", "check", "it"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def groups_of_varied_lengths() -> list[list[ScoringItem]]:
    """Three prompts of different lengths and kinds (plain text, chat messages with a system
    turn, a long one), each with responses of different lengths."""
    prompts: list[str | list[dict[str, str]]] = [
        "What is 2+2?",
        [{"role": "system", "content": "Reason step by step."},
         {"role": "user", "content": "Solve " + words(12, 1)}],
        "Problem: " + words(60, 2),
    ]
    return [[ScoringItem(prompt, words(3 + 9 * j + g, 10 * g + j), "7") for j in range(4)]
            for g, prompt in enumerate(prompts)]


def assert_same_scores(shared: Sequence[float], unshared: Sequence[float]) -> None:
    assert len(shared) == len(unshared)
    assert max(abs(a - b) for a, b in zip(shared, unshared)) <= TOLERANCE
    # The comparison means something only if the scores themselves differ well beyond it.
    assert max(unshared) - min(unshared) > 100 * TOLERANCE


def test_several_groups_in_one_batch_score_as_unshared(rm_dir: Path) -> None:
    on, off = sharing_and_not(rm_dir)
    assert on.shares_prefixes and not off.shares_prefixes
    items = [item for group in groups_of_varied_lengths() for item in group]
    random.Random(0).shuffle(items)  # the groups interleaved in the batch
    shared, unshared = on.encode(items), off.encode(items)

    assert [e.payload for e in shared] == [e.payload for e in unshared]
    assert all(e.shared_prefix is None for e in unshared)
    prefixes = {item.prompt if isinstance(item.prompt, str) else "chat": e.shared_prefix
                for item, e in zip(items, shared)}
    assert all(p is not None for p in prefixes.values())
    assert len({p.key for p in prefixes.values() if p}) == 3
    assert len({p.n_tokens for p in prefixes.values() if p}) == 3  # different prompt lengths
    for e in shared:
        assert e.shared_prefix is not None
        assert tuple(e.payload[:e.shared_prefix.n_tokens]) == e.shared_prefix.key

    scores = on.forward(shared)
    assert_same_scores(scores, off.forward(unshared))
    # Alone (one item, its own prefix) or together: the same score.
    assert [on.forward([e])[0] for e in shared[:3]] == pytest.approx(scores[:3], abs=TOLERANCE)


def test_truncated_items_keep_sharing_unless_the_prompt_was_cut(rm_dir: Path) -> None:
    on, off = sharing_and_not(rm_dir, max_length=48)
    long_responses = [ScoringItem("What is 2+2?", words(80 + 7 * j, j) + " so it is four")
                      for j in range(3)]
    too_long_prompt = [ScoringItem("Problem: " + words(70, 5), words(5 + j, j)) for j in range(2)]
    items = [*long_responses, ScoringItem("What is 2+2?", "four"), *too_long_prompt]
    shared, unshared = on.encode(items), off.encode(items)

    assert [e.truncated for e in shared] == [True, True, True, False, True, True]
    assert all(e.n_tokens <= 48 for e in shared)
    # The response was cut from its front, the prompt kept: still one shared prefix.
    assert len({e.shared_prefix.key for e in shared[:4] if e.shared_prefix}) == 1
    assert all(e.shared_prefix is not None for e in shared[:4])
    # The prompt alone was over the limit and clipped from the left: not a prefix any more.
    assert all(e.shared_prefix is None for e in shared[4:])
    assert_same_scores(on.forward(shared), off.forward(unshared))


def test_a_tokenizer_without_a_pad_token_pools_the_same_position(tmp_path: Path) -> None:
    path = build_tiny_decoder_rm(tmp_path / "nopad", with_pad_token=False)
    on, off = sharing_and_not(path)
    assert on.tokenizer.pad_token_id == on.tokenizer.eos_token_id
    items = [item for group in groups_of_varied_lengths()[:2] for item in group]
    shared, unshared = on.encode(items), off.encode(items)
    # The template ends each sequence with EOS = pad, so the head pools the token before it.
    assert all(e.payload[-1] == on.tokenizer.eos_token_id for e in shared)
    assert all(e.shared_prefix is not None for e in shared)
    assert_same_scores(on.forward(shared), off.forward(unshared))


def test_a_prompt_whose_last_word_merges_into_the_response_is_not_shared(rm_dir: Path) -> None:
    """A policy-rendered prompt in a format the RM cannot parse is scored verbatim, prompt +
    response: where the response continues the prompt's last word, the tokenizer merges across
    the boundary and the prompt's ids are no prefix — that item runs unshared, its group's other
    items still share. So does an empty response, whose pooled token would be in the prompt."""
    on, off = sharing_and_not(rm_dir)
    prompt = render_prompt(policy_tokenizer("gptoss"), [{"role": "user", "content": "2+2?"}])
    prompt += "The answ"
    merged = ScoringItem(prompt, "er is four")  # "answ" + "er" -> one token "answer"
    separate = [ScoringItem(prompt, " " + words(4 + j, j)) for j in range(3)]
    empty = ScoringItem(prompt, "")
    items = [merged, *separate, empty]
    shared, unshared = on.encode(items), off.encode(items)

    prompt_ids = on.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert list(shared[0].payload[:len(prompt_ids)]) != prompt_ids
    assert shared[0].shared_prefix is None and shared[-1].shared_prefix is None
    assert all(e.shared_prefix is not None and e.shared_prefix.n_tokens == len(prompt_ids)
               for e in shared[1:-1])
    assert_same_scores(on.forward(shared), off.forward(unshared))


def test_an_item_without_a_prompt_has_nothing_to_share(rm_dir: Path) -> None:
    # The chat template refuses an empty conversation; the item runs whole.
    on, off = sharing_and_not(rm_dir)
    items = [ScoringItem("", words(3 + 4 * j, j)) for j in range(3)]
    shared = on.encode(items)
    assert all(e.shared_prefix is None for e in shared)
    assert_same_scores(on.forward(shared), off.forward(off.encode(items)))


def test_encoders_and_sliding_windows_do_not_share(tmp_path: Path) -> None:
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    from hero_service.reward_models.embedded import EmbeddedRewardModel, embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1))
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    encoder = load_reward_model(f"hf:{tmp_path / 'bert'}", device="cpu")
    assert not encoder.shares_prefixes
    assert "not a causal decoder" in (prefix_sharing_unsupported(bert) or "")
    encoded = encoder.encode([ScoringItem("What is 2+2?", "four"), ScoringItem("What is 2+2?",
                                                                               "five")])
    assert all(e.shared_prefix is None for e in encoded)

    embedded = EmbeddedRewardModel(device="cpu")
    assert not embedded.shares_prefixes
    assert all(e.shared_prefix is None
               for e in embedded.encode([ScoringItem("q", "four", "4")] * 2))

    sliding = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
        sliding_window=16, max_window_layers=0, num_labels=1))
    assert "full attention" in (prefix_sharing_unsupported(sliding) or "")


def test_the_switch_turns_sharing_off_from_flag_and_environment(
        rm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_args(parser.parse_args([])).share_prompts is True
    assert settings_from_args(parser.parse_args(["--no-share-prompts"])).share_prompts is False
    monkeypatch.setenv("HERO_SHARE_PROMPTS", "false")
    assert settings_from_args(parser.parse_args([])).share_prompts is False
    assert settings_from_args(parser.parse_args(["--share-prompts"])).share_prompts is True

    _, off = sharing_and_not(rm_dir)
    assert not off.shares_prefixes
    assert all(e.shared_prefix is None for e in off.encode(groups_of_varied_lengths()[0]))

    # The service builds its model from the settings: the switch reaches it there too.
    for share in (True, False):
        served = default_reward_model(Settings(reward_model=f"hf:{rm_dir}", device="cpu",
                                               share_prompts=share))
        assert served.shares_prefixes is share
        served.close()


# -- the batcher: one prefix per forward, counted once -------------------------------------------


def shared(key: str, prefix: int, own: int) -> Encoded:
    return Encoded(key=(key, own), n_tokens=prefix + own, truncated=False, payload=None,
                   shared_prefix=SharedPrefix(key=key, n_tokens=prefix))


def test_the_cost_counts_each_distinct_prefix_once_as_it_is_computed() -> None:
    batch = [shared("a", 10, 3), shared("a", 10, 5), shared("b", 6, 4)]
    alone = Encoded(key="c", n_tokens=7, truncated=False, payload=None)
    # padded: the prefixes are a rectangle (2 x longest prefix), the rest another (n x longest)
    assert batch_cost(batch, padded=True, shares_prefixes=True) == 2 * 10 + 3 * 5
    assert batch_cost([*batch, alone], padded=True, shares_prefixes=True) == 2 * 10 + 4 * 7
    assert batch_cost(batch, padded=False, shares_prefixes=True) == (10 + 6) + (3 + 5 + 4)
    # A backend that does not share computes every item whole.
    assert batch_cost(batch, padded=True) == 3 * 15
    assert batch_cost(batch, padded=False) == 13 + 15 + 10


def test_packing_keeps_each_prefix_together_within_the_budget() -> None:
    # Two groups of 6, interleaved; a group costs 20 + 6 x 6 = 56 when its prompt counts once,
    # 6 x 26 = 156 when every item carries it.
    items = [shared(key, 20, own) for own in (2, 6, 4, 5, 3, 1) for key in ("a", "b")]
    batches = pack_batches(items, max_batch_tokens=60, shares_prefixes=True)
    assert sorted(len(b) for b in batches) == [6, 6]
    for batch in batches:
        assert len({e.shared_prefix.key for e in batch if e.shared_prefix}) == 1
        assert batch_cost(batch, padded=True, shares_prefixes=True) <= 60
    # The same items for a backend that does not share: by length, within the same budget.
    plain = pack_batches(items, max_batch_tokens=60)
    assert all(batch_cost(b, padded=True) <= 60 for b in plain) and len(plain) == 6


class RecordingRM(HFRewardModel):
    """The real hf backend, remembering which items each forward got."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batches: list[list[Encoded]] = []

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.batches.append(list(batch))
        return super().forward(batch)


def test_through_the_batcher_groups_share_one_forward_and_score_as_unshared(
        rm_dir: Path) -> None:
    model = RecordingRM(rm_dir, device="cpu")
    _, off = sharing_and_not(rm_dir)
    groups = groups_of_varied_lengths()
    encoded = [model.encode(group) for group in groups]
    # A budget one group fits in with its prompt counted once, but not with it counted per item.
    one_group = max(batch_cost(e, padded=True, shares_prefixes=True) for e in encoded)
    assert max(batch_cost(e, padded=True) for e in encoded) > one_group
    batcher = Batcher(model, max_batch_tokens=one_group, max_wait_ms=50.0, metrics=Metrics())
    batcher.start()
    try:
        async def score_concurrently() -> list[list[float]]:
            batcher.announce(sum(len(g) for g in groups))
            requests = [batcher.score(e) for e in encoded]
            batcher.withdraw(sum(len(g) for g in groups))
            return [[s.score for s in scored] for scored in await asyncio.gather(*requests)]

        scores = asyncio.run(score_concurrently())
    finally:
        batcher.stop()
    for group, got in zip(groups, scores):
        assert_same_scores(got, off.forward(off.encode(group)))
    # Each group's items went through the model in one forward, with its prompt once.
    for e in encoded:
        keys = {x.key for x in e}
        assert any(keys <= {x.key for x in batch} for batch in model.batches)
    assert all(batch_cost(b, padded=True, shares_prefixes=True) <= one_group
               for b in model.batches)
