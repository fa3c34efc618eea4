"""Helpers for the trainer-adapter tests: /metrics counters, tiny offline tokenizers/policies."""

from __future__ import annotations

import httpx
from support import CHAT_TEMPLATE


def metric(url: str, name: str, labels: str = "") -> float:
    """The value of one Prometheus sample (0 if absent), e.g. metric(url,
    "hero_rollouts_scored_total", 'mode="hero"')."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def minilm_chat_tokenizer():
    """MiniLM's WordPiece tokenizer (shipped in the embedded-model package, so nothing is
    downloaded) with a chat template that has a generation prompt, EOS = [SEP], and no
    token_type_ids (a causal LM's generate() rejects them)."""
    from transformers import AutoTokenizer

    from hero_service.reward_models.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    tokenizer.chat_template = (CHAT_TEMPLATE
                               + "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer.eos_token = "[SEP]"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def tiny_causal_lm(tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A tiny random Llama policy over ``tokenizer``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id)
    return LlamaForCausalLM(config)


def byte_level_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained here on ``corpus`` (milliseconds, offline). Unlike
    WordPiece it decodes back to exactly the text it encoded, as the real LLM tokenizers that
    verl and OpenRLHF decode rollouts with do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
