"""The ``hf`` backend: any local ``AutoModelForSequenceClassification`` reward model directory
(Skywork-Reward, AceMath-RM, ...). Conversations go through the tokenizer's chat template; bf16 on
GPU, fp32 on CPU; SDPA attention; right padding with a real pad token; over-long inputs keep the
*end* of the response (the final answer) and are flagged ``truncated``.

What the RM is shown (``render_item``):

- A prompt given as chat messages, or as plain text (one user message), is rendered with the RM's
  chat template (without one: the contents joined by newlines, then the response).
- A string prompt already rendered with a *policy's* chat template (OpenRLHF with
  ``--data.apply_chat_template``) is parsed back into messages and rendered with the RM's own
  template; one in a format that cannot be parsed is scored verbatim, prompt + response, with no
  template on top — never templated twice (rules in ``templates.py``).
- The response's trailing special-token text (the policy's ``<|im_end|>``, ``</s>``, pad...; the
  built-in list of ``special_tokens.py`` plus this tokenizer's own special tokens) is removed
  first: the RM's template writes the turn's end itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from ..special_tokens import DEFAULT_SPECIAL_TOKEN_TEXTS, TrailingTokenStripper
from . import templates
from ._torch_utils import pad_right, resolve_device, resolve_dtype
from .base import (
    Encoded,
    Messages,
    PromptLike,
    RewardModel,
    ScoringItem,
    as_messages,
    prompt_key,
    render_plain,
    tail,
)

# Fallback when neither --max-length nor the model gives a usable limit.
DEFAULT_MAX_TOKENS = 4096


class HFRewardModel(RewardModel):
    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"reward model directory {path} does not exist")
        self.model_id = f"hf:{path.name}"
        self.device = resolve_device(device)
        self.device_type = self.device.type
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = self._load(path, trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            # Decoder RMs often ship without a pad token; the pooled position is the last
            # non-pad token, so pad with EOS rather than resizing the embeddings.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an EOS token")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_tokens = max_length or self._model_limit()
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.strip_special_tokens = TrailingTokenStripper(
            (*DEFAULT_SPECIAL_TOKEN_TEXTS, *self.tokenizer.all_special_tokens))

    def _load(self, path: Path, trust_remote_code: bool) -> PreTrainedModel:
        kwargs = dict(dtype=self.dtype, trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, attn_implementation="sdpa", **kwargs
            )
        except (ValueError, ImportError):  # architecture without SDPA support
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        return model.to(self.device).eval()

    def _model_limit(self) -> int:
        limits = [getattr(self.model.config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
        return min(usable) if usable else DEFAULT_MAX_TOKENS

    def conversation(self, prompt: PromptLike) -> Messages | None:
        """The messages the RM's template renders for ``prompt``; None: score it verbatim."""
        if isinstance(prompt, str) and templates.looks_rendered(prompt):
            return templates.prompt_messages(prompt)
        return as_messages(prompt)

    def render_item(self, item: ScoringItem) -> str:
        """The exact text this RM scores for ``item``."""
        response = self.strip_special_tokens(item.response)
        messages = self.conversation(item.prompt)
        if messages is None:
            assert isinstance(item.prompt, str)
            return item.prompt + response
        return self.render(messages, response)

    def render(self, prompt: list[dict[str, str]], response: str) -> str:
        if self.has_chat_template:
            conversation = [*prompt, {"role": "assistant", "content": response}]
            return _text(self.tokenizer.apply_chat_template(conversation, tokenize=False))
        return render_plain(prompt, response)

    def _token_ids(self, text: str, add_special: bool | None = None) -> list[int]:
        # The chat template already wrote the special tokens (BOS etc.) as text.
        if add_special is None:
            add_special = not self.has_chat_template
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def encode_one(self, item: ScoringItem) -> Encoded:
        messages = self.conversation(item.prompt)
        if messages is None:
            # Verbatim: the policy's rendering already holds its BOS and turn markers as text
            # (as OpenRLHF's serve_rm.py tokenizes a query). Over-long: keep the end.
            ids, truncated = tail(self._token_ids(self.render_item(item), add_special=False),
                                  self.max_tokens)
            return Encoded(key=(prompt_key(item.prompt), item.response), n_tokens=len(ids),
                           truncated=truncated, payload=tuple(ids))
        response = self.strip_special_tokens(item.response)
        ids = self._token_ids(self.render(messages, response))
        truncated = False
        if len(ids) > self.max_tokens:
            # Cut the response from the front, keeping its end, then re-render so the template's
            # closing tokens survive; clip from the left if the prompt alone is too long.
            truncated = True
            overhead = len(self._token_ids(self.render(messages, "")))
            response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            kept, _ = tail(response_ids, self.max_tokens - overhead)
            shortened = _text(self.tokenizer.decode(kept))
            ids = self._token_ids(self.render(messages, shortened))
            ids, _ = tail(ids, self.max_tokens)
        return Encoded(
            key=(prompt_key(item.prompt), item.response),
            n_tokens=len(ids),
            truncated=truncated,
            payload=tuple(ids),
        )

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        return [self.encode_one(item) for item in items]

    @torch.inference_mode()
    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        ids, mask = pad_right([e.payload for e in batch], self.tokenizer.pad_token_id, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits[:, 0].float().cpu().tolist()


def _text(value: object) -> str:
    """What the tokenizer returns for one text (its stubs allow a list or an encoding too)."""
    if not isinstance(value, str):
        raise TypeError(f"the tokenizer returned {type(value).__name__}, not text")
    return value
