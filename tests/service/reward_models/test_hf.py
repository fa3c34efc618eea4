"""The hf backend on a real (tiny, random) decoder-style sequence classifier saved to disk."""

from __future__ import annotations

import math

import pytest
from chat_template_support import dev_messages, policy_tokenizer, render_prompt
from support import build_tiny_decoder_rm

from hero_service.reward_models import ScoringItem, load_reward_model


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return build_tiny_decoder_rm(tmp_path_factory.mktemp("tiny-rm"))


@pytest.fixture(scope="module")
def rm(rm_dir):
    return load_reward_model(f"hf:{rm_dir}", device="cpu")


def test_loads_on_cpu_in_fp32_with_the_chat_template(rm):
    import torch

    assert rm.dtype == torch.float32 and rm.device.type == "cpu"
    assert rm.has_chat_template
    text = rm.render([{"role": "user", "content": "2+2?"}], "4")
    assert text.startswith("[user] 2+2?") and "[assistant] 4" in text


def test_scores_do_not_depend_on_batch_padding(rm):
    short = ScoringItem("What is 2+2?", "It is 4.")
    long = ScoringItem("What is 2+2?", "Let me think step by step. " * 20 + "It is 4.")
    alone = rm.forward(rm.encode([short]))[0]
    batched = rm.forward(rm.encode([long, short, long]))
    assert math.isfinite(alone)
    assert batched[1] == pytest.approx(alone, abs=1e-5)
    assert batched[0] == pytest.approx(batched[2], abs=1e-6)


def test_chat_message_prompts_are_scored(rm):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    (enc,) = rm.encode([ScoringItem(prompt, "4")])
    assert enc.n_tokens == len(enc.payload) and not enc.truncated
    assert math.isfinite(rm.forward([enc])[0])


def test_truncation_keeps_the_end_of_the_response(rm_dir):
    small = load_reward_model(f"hf:{rm_dir}", device="cpu", max_length=40)
    response = "filler words " * 100 + "so the final answer is forty two"
    (enc,) = small.encode([ScoringItem("question?", response)])
    assert enc.truncated and enc.n_tokens <= 40
    decoded = small.tokenizer.decode(enc.payload)
    assert decoded.rstrip().endswith("forty two [SEP]")  # the answer and the template's close
    assert "question" in decoded  # the prompt is kept; the response is cut from its front
    (short,) = small.encode([ScoringItem("question?", "forty two")])
    assert not short.truncated


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    path = build_tiny_decoder_rm(tmp_path / "nopad", with_pad_token=False)
    rm = load_reward_model(f"hf:{path}", device="cpu")
    assert rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id
    assert rm.model.config.pad_token_id == rm.tokenizer.eos_token_id
    scores = rm.forward(rm.encode([ScoringItem("q", "a"), ScoringItem("q", "a longer answer")]))
    assert all(math.isfinite(s) for s in scores)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reward_model(f"hf:{tmp_path / 'nope'}")


# -- what the RM is shown: prompts rendered by the policy, the policy's EOS text --------------


@pytest.mark.parametrize("policy", ["qwen2_5", "llama3"])
def test_policy_rendered_prompt_is_not_templated_twice(rm, dev_rows, policy):
    """OpenRLHF --data.apply_chat_template: the prompt arrives rendered by the policy's real
    template; the RM must see its own template around the same conversation, once."""
    row = dev_rows[3]
    messages = dev_messages(row)
    rendered = render_prompt(policy_tokenizer(policy), messages)
    eos = {"qwen2_5": "<|im_end|>", "llama3": "<|eot_id|>"}[policy]
    sent = ScoringItem(rendered, row["responses"][0] + eos)
    clean = ScoringItem(messages, row["responses"][0])
    assert rm.render_item(sent) == rm.render(messages, row["responses"][0])
    assert "im_start" not in rm.render_item(sent) and "header_id" not in rm.render_item(sent)
    (got,), (want,) = rm.encode([sent]), rm.encode([clean])
    assert got.payload == want.payload  # the same token ids as the conversation itself
    # what it used to be: the rendered prompt wrapped in a user turn and templated again
    (doubled,) = rm.encode([ScoringItem([{"role": "user", "content": rendered}],
                                        row["responses"][0] + eos)])
    assert doubled.payload != want.payload
    assert rm.forward([got]) == pytest.approx(rm.forward([want]), abs=1e-6)


def test_rendered_prompt_in_an_unknown_format_is_scored_verbatim(rm):
    prompt = render_prompt(policy_tokenizer("gptoss"), [{"role": "user", "content": "2+2?"}])
    item = ScoringItem(prompt, "<|channel|>final<|message|>4<|return|>")
    text = rm.render_item(item)
    assert text == prompt + "<|channel|>final<|message|>4"  # no RM template, the EOS removed
    (enc,) = rm.encode([item])
    assert list(enc.payload) == rm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_trailing_eos_text_is_removed_before_the_rm_template(rm):
    endings = ["<|im_end|>", "<|endoftext|><|endoftext|>", "</s>", "[SEP]", "<end_of_turn>\n"]
    (want,) = rm.encode([ScoringItem("What is 2+2?", "It is 4.")])
    for ending in endings:
        (got,) = rm.encode([ScoringItem("What is 2+2?", "It is 4." + ending)])
        assert got.payload == want.payload, ending
