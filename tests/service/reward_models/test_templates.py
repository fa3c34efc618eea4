"""Prompts rendered with a policy's real chat template are read back into messages (so the RM's
own template renders them once), or recognised as rendered and left alone."""

from __future__ import annotations

import pytest
from chat_template_support import dev_messages, policy_tokenizer, render_prompt

from hero_service.reward_models import templates

CONVERSATIONS = [
    [{"role": "system", "content": "Please reason step by step."},
     {"role": "user", "content": "What is $2+2$?\nAnswer in \\boxed{}."}],
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2+2?"}],
]
# Real templates (TRL's verbatim copies). Gemma 1 has no system role; the rest render all three.
TEMPLATES = ["qwen2_5", "qwen3", "qwen3_5_nothink", "qwen3_5_think", "llama3", "llama3_1",
             "llama3_2", "gemma", "gemma3", "gemma4", "deepseekv3", "deepseek_r1_distill",
             "phi3", "phi3_5", "glm4moe", "cohere", "lfm2", "nemotron_3_nano"]


def renderable(tokenizer, conversation):
    try:
        return render_prompt(tokenizer, conversation)
    except Exception:  # e.g. Gemma 1 raises on a system turn
        return None


@pytest.mark.parametrize("name", TEMPLATES)
def test_rendered_prompts_read_back_into_the_same_conversation(name):
    tokenizer = policy_tokenizer(name)
    rendered_any = 0
    for conversation in CONVERSATIONS:
        prompt = renderable(tokenizer, conversation)
        if prompt is None:
            continue
        rendered_any += 1
        assert templates.looks_rendered(prompt)
        messages = templates.prompt_messages(prompt)
        assert messages is not None, prompt
        # the question survives as the last user turn, word for word (templates that fold the
        # system prompt into it, like Gemma 3's, put it in front)
        assert messages[-1]["role"] == "user"
        assert messages[-1]["content"].endswith(conversation[-1]["content"])
        # and rendering the messages read back gives the policy's prompt again, byte for byte
        assert render_prompt(tokenizer, messages) == prompt
    assert rendered_any >= 2


def test_llama31_date_preamble_is_left_to_the_template():
    tokenizer = policy_tokenizer("llama3_1")
    prompt = render_prompt(tokenizer, CONVERSATIONS[1])
    assert "Cutting Knowledge Date" in prompt
    # the template writes it into an otherwise empty system turn: no system message is left
    assert templates.prompt_messages(prompt) == CONVERSATIONS[1]


def test_mistral_inst_prompts_read_back():
    """LLaVA-NeXT's Mistral template (TRL's copy): <<SYS>> block, [INST] ... [/INST] turns."""
    tokenizer = policy_tokenizer("llava_next")

    def parts(conversation):
        return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                for m in conversation]

    for conversation in CONVERSATIONS:
        prompt = render_prompt(tokenizer, parts(conversation))
        messages = templates.prompt_messages(prompt)
        assert messages is not None, prompt
        assert render_prompt(tokenizer, parts(messages)) == prompt


def test_generation_prefill_is_not_part_of_the_conversation():
    tokenizer = policy_tokenizer("deepseek_r1_distill")
    prompt = render_prompt(tokenizer, CONVERSATIONS[0])
    parsed = templates.parse_chat(prompt)
    assert parsed.awaits_assistant and parsed.open_text == "<think>\n"
    assert templates.prompt_messages(prompt) == CONVERSATIONS[0]
    assert templates.generation_anchor(prompt) == "<｜Assistant｜><think>\n"


@pytest.mark.parametrize("name", ["gptoss", "smolvlm", "idefics3"])
def test_formats_not_parsed_here_are_still_recognised_as_rendered(name):
    tokenizer = policy_tokenizer(name)
    prompt = renderable(tokenizer, CONVERSATIONS[1])
    assert prompt is not None
    assert templates.looks_rendered(prompt)
    assert templates.prompt_messages(prompt) is None  # scored verbatim, never re-templated


def test_plain_and_malformed_prompts_are_not_conversations(dev_rows):
    plain = dev_rows[0]["prompt"]
    assert not templates.looks_rendered(plain) and templates.prompt_messages(plain) is None
    rendered = render_prompt(policy_tokenizer("qwen2_5"), dev_messages(dev_rows[0]))
    # no generation prompt at the end: the response would not follow an assistant header
    closed = rendered[: rendered.rindex("<|im_start|>assistant")]
    assert templates.prompt_messages(closed) is None
    # text in front of the first turn, a turn that never ends, a role the schema cannot name
    assert templates.prompt_messages("Note: " + rendered) is None
    assert templates.prompt_messages(rendered.replace("<|im_end|>", "", 1)) is None
    tool = rendered.replace("<|im_start|>user", "<|im_start|>tool", 1)
    assert templates.prompt_messages(tool) is None

