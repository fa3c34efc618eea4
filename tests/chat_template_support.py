"""Real chat templates without a download: the verbatim model templates TRL ships
(``trl/chat_templates/*.jinja``: Qwen2.5's ChatML, Llama 3/3.1, Gemma, DeepSeek, Phi-3, ...) set on
MiniLM's tokenizer from the embedded-model package, rendered by transformers'
``apply_chat_template`` exactly as a policy's tokenizer renders OpenRLHF prompts."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

# The BOS text each family's tokenizer supplies as ``bos_token`` to its template.
BOS_TOKENS = {
    "llama3": "<|begin_of_text|>", "llama3_1": "<|begin_of_text|>",
    "llama3_2": "<|begin_of_text|>", "gemma": "<bos>", "gemma3": "<bos>", "gemma4": "<bos>",
    "deepseekv3": "<｜begin▁of▁sentence｜>", "deepseek_r1_distill": "<｜begin▁of▁sentence｜>",
    "cohere": "<BOS_TOKEN>", "lfm2": "<|startoftext|>",
}


def template_text(name: str) -> str:
    path = Path(str(importlib.resources.files("trl"))) / "chat_templates" / f"{name}.jinja"
    return path.read_text()


def policy_tokenizer(name: str):
    """MiniLM's tokenizer carrying the real ``name`` chat template (e.g. ``qwen2_5``)."""
    from transformers import AutoTokenizer

    from hero_service.reward_models.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    tokenizer.chat_template = template_text(name)
    if name in BOS_TOKENS:
        tokenizer.bos_token = BOS_TOKENS[name]
    return tokenizer


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """What OpenRLHF's PromptDataset does with --data.apply_chat_template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def dev_messages(row: dict) -> list[dict[str, str]]:
    return [{"role": "system", "content": row["system"]},
            {"role": "user", "content": row["prompt"]}]
