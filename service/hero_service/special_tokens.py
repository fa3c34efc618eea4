"""Trailing EOS / pad text in responses.

OpenRLHF builds ``query`` with ``tokenizer.decode(prompt + response ids,
skip_special_tokens=False)``, and vLLM's output ids end with the policy's EOS, so responses arrive
as ``...\\boxed{42}<|im_end|>`` (sometimes followed by pad: ``<|endoftext|><|endoftext|>``).
That text is not part of the answer: ``exact`` would compare ``42<|im_end|>`` with ``42``, and a
chat-templated RM would see the policy's end marker inside an assistant turn its own template
closes anyway.

The rule: a trailing run of special-token texts — and the whitespace between and before them —
is removed; nothing else is touched (a token in the middle of a response stays, a response with
none is returned unchanged). The service applies it before every verifier (all endpoints) and to
``/get_reward`` responses before they go anywhere (``--strip-special-tokens``, on by default;
``--extra-special-tokens`` adds texts); the ``hf`` backend applies it, with its own tokenizer's
special tokens added, before its chat template writes the turn's end."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

# The end-of-turn, end-of-text and pad texts of common policy families.
DEFAULT_SPECIAL_TOKEN_TEXTS: tuple[str, ...] = (
    "<|im_end|>", "<|endoftext|>",                       # ChatML / Qwen / GPT-2 pad
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",       # Llama 3
    "<|finetune_right_pad_id|>",                          # Llama 3.1 pad
    "<|eot|>",                                            # Llama 4
    "</s>", "<pad>",                                      # Llama 2 / Mistral / T5-style
    "<end_of_turn>", "<eos>",                             # Gemma
    "<turn|>",                                            # Gemma 4
    "<|end|>",                                            # Phi-3
    "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",                  # DeepSeek
    "<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|>",          # Cohere
    "<|return|>", "<|endofprompt|>",                      # gpt-oss, tiktoken
    "<|user|>", "<|observation|>",                        # GLM-4 stops on the next turn's header
)

Stripper = Callable[[str], str]


def parse_token_list(value: str) -> tuple[str, ...]:
    """``"<|a|>, <b>"`` → ``("<|a|>", "<b>")`` (the flag's comma-separated form)."""
    return tuple(t.strip() for t in value.split(",") if t.strip())


class TrailingTokenStripper:
    def __init__(self, texts: Iterable[str]) -> None:
        # Longest first, so "<|eot_id|>" is not mistaken for a shorter text that it ends with.
        self.texts = tuple(sorted({t for t in texts if t and not t.isspace()},
                                  key=len, reverse=True))

    def __call__(self, text: str) -> str:
        end = len(text)
        found = False
        while True:
            cut = end
            while cut > 0 and text[cut - 1].isspace():
                cut -= 1
            token = next((t for t in self.texts if text.endswith(t, 0, cut)), None)
            if token is None:
                break
            end, found = cut - len(token), True
        if not found:
            return text
        while end > 0 and text[end - 1].isspace():
            end -= 1
        return text[:end]


def _unchanged(text: str) -> str:
    return text


@lru_cache(maxsize=8)
def stripper(enabled: bool = True, extra: str = "") -> Stripper:
    """The stripper the settings ask for (``enabled`` = ``--strip-special-tokens``, ``extra`` =
    ``--extra-special-tokens``); the identity when disabled."""
    if not enabled:
        return _unchanged
    return TrailingTokenStripper((*DEFAULT_SPECIAL_TOKEN_TEXTS, *parse_token_list(extra)))
