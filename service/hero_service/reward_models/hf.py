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
  first: the RM's template writes the turn's end itself.

Prefix sharing (``share_prompts``, on by default where it is exact): a group's N responses share
one rendered prompt, and with a causal decoder (a ``*ForSequenceClassification`` of the
Llama/Qwen/Mistral kind, which pools the last non-pad token through its ``score`` head) the
prompt's keys and values do not depend on what follows, so ``forward`` computes them once per
distinct prompt in a batch and runs only the responses on top of that cache. ``encode`` marks an
item shareable only where that is exact for it: the prompt's own token ids are an exact prefix of
the item's ids (not where the tokenizer merges text across the boundary, nor where truncation cut
the prompt) and the pooled position lies after them. Off for encoders (BERT-style heads pool
elsewhere and attend both ways), sliding-window or linear-attention layers, and attention
kernels other than SDPA/eager."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path

import jinja2
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..special_tokens import DEFAULT_SPECIAL_TOKEN_TEXTS, TrailingTokenStripper
from . import templates
from ._torch_utils import pad_right, resolve_device, resolve_dtype
from .base import (
    Encoded,
    Messages,
    PromptLike,
    RewardModel,
    ScoringItem,
    SharedPrefix,
    as_messages,
    prompt_key,
    render_plain,
    tail,
)

log = logging.getLogger(__name__)

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
        share_prompts: bool = True,
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
        why_not = prefix_sharing_unsupported(self.model) if share_prompts else "switched off"
        self.shares_prefixes = why_not is None
        log.info("%s: prompt sharing %s", self.model_id,
                 "on" if why_not is None else f"off ({why_not})")
        # The decoder's keyword for the cache in this transformers version (``past_key_values``
        # before 5.x); only a model that shares prompts is asked (only it is a known decoder).
        self._cache_kwarg = "cache"
        if self.shares_prefixes and "cache" not in inspect.signature(
                self._base_model.forward).parameters:
            self._cache_kwarg = "past_key_values"

    @property
    def _base_model(self) -> torch.nn.Module:
        """The decoder under the classification head."""
        module = getattr(self.model, self.model.base_model_prefix)
        assert isinstance(module, torch.nn.Module)
        return module

    def _load(self, path: Path, trust_remote_code: bool) -> PreTrainedModel:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, attn_implementation="sdpa", dtype=self.dtype,
                trust_remote_code=trust_remote_code)
        except (ValueError, ImportError):  # architecture without SDPA support
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=self.dtype, trust_remote_code=trust_remote_code)
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

    def prompt_text(self, item: ScoringItem) -> str | None:
        """The rendered prompt: the text this RM scores for ``item`` up to its response (with the
        chat template's generation prompt, where it has one); None: no prompt to share."""
        messages = self.conversation(item.prompt)
        if messages is None:
            assert isinstance(item.prompt, str)
            return item.prompt
        if not messages:
            return None
        if not self.has_chat_template:
            return render_plain(messages, "")
        try:
            return _text(self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True))
        except (ValueError, TypeError, jinja2.TemplateError):
            # A template that will not render the prompt alone (some insist on an assistant
            # turn): nothing to share, the item runs whole.
            return None

    def encode_one(self, item: ScoringItem,
                   prompt_ids: dict[str, tuple[int, ...]] | None = None) -> Encoded:
        """``prompt_ids``: the prompts' token ids already computed (by text), shared by the
        items of one ``encode`` call."""
        ids, truncated = self._ids(item)
        shared = None
        text = self.prompt_text(item) if self.shares_prefixes else None
        if text is not None:
            known = {} if prompt_ids is None else prompt_ids
            if text not in known:
                known[text] = tuple(self._token_ids(
                    text, add_special=False if self.conversation(item.prompt) is None else None))
            shared = self._shared_prefix(known[text], ids)
        return Encoded(key=(prompt_key(item.prompt), item.response), n_tokens=len(ids),
                       truncated=truncated, payload=tuple(ids), shared_prefix=shared)

    def _shared_prefix(self, prompt: tuple[int, ...], ids: Sequence[int]) -> SharedPrefix | None:
        """The prompt as a shared prefix of ``ids``, where computing it apart is exact: it is an
        exact prefix (no token merged across the boundary, not cut by truncation) and the
        pooled position (the last non-pad token, as the head picks it) lies after it."""
        if not prompt or tuple(ids[:len(prompt)]) != prompt:
            return None
        if _last_non_pad(ids, self.tokenizer.pad_token_id) < len(prompt):
            return None
        return SharedPrefix(key=prompt, n_tokens=len(prompt))

    def _ids(self, item: ScoringItem) -> tuple[list[int], bool]:
        """The token ids this RM scores for ``item``, and whether they were truncated."""
        messages = self.conversation(item.prompt)
        if messages is None:
            # Verbatim: the policy's rendering already holds its BOS and turn markers as text
            # (as OpenRLHF's serve_rm.py tokenizes a query). Over-long: keep the end.
            return tail(self._token_ids(self.render_item(item), add_special=False),
                        self.max_tokens)
        response = self.strip_special_tokens(item.response)
        ids = self._token_ids(self.render(messages, response))
        if len(ids) <= self.max_tokens:
            return ids, False
        # Cut the response from the front, keeping its end, then re-render so the template's
        # closing tokens survive; clip from the left if the prompt alone is too long.
        overhead = len(self._token_ids(self.render(messages, "")))
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        kept, _ = tail(response_ids, self.max_tokens - overhead)
        shortened = _text(self.tokenizer.decode(kept))
        ids, _ = tail(self._token_ids(self.render(messages, shortened)), self.max_tokens)
        return ids, True

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        prompt_ids: dict[str, tuple[int, ...]] = {}
        return [self.encode_one(item, prompt_ids) for item in items]

    @torch.inference_mode()
    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        if any(e.shared_prefix is not None for e in batch):
            return self._forward_sharing(batch)
        ids, mask = pad_right([e.payload for e in batch], self.tokenizer.pad_token_id, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits[:, 0].float().cpu().tolist()

    def _forward_sharing(self, batch: Sequence[Encoded]) -> list[float]:
        """The distinct prefixes run once (their keys/values cached), the cache is expanded to
        one row per item, and each item's remaining tokens run on top of its prefix's row with
        the positions they have in the full sequence; an item that shares nothing runs whole on
        a row whose prefix part is masked out. The score is the head on the last non-pad token,
        as the model's own forward pools."""
        pad = self.tokenizer.pad_token_id
        rows: dict[Hashable, int] = {}  # prefix key -> its row in the prefix batch
        prefixes: list[Sequence[int]] = []
        item_rows: list[int] = []
        prefix_lengths: list[int] = []
        for e in batch:
            shared = e.shared_prefix
            if shared is None:
                item_rows.append(0)
                prefix_lengths.append(0)
                continue
            if shared.key not in rows:
                rows[shared.key] = len(prefixes)
                prefixes.append(e.payload[:shared.n_tokens])
            item_rows.append(rows[shared.key])
            prefix_lengths.append(shared.n_tokens)

        cache = DynamicCache(config=self.model.config)
        prefix_ids, prefix_mask = pad_right(prefixes, pad, self.device)
        self._base_model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True,
                         **{self._cache_kwarg: cache})
        cache.batch_select_indices(torch.tensor(item_rows, device=self.device))

        rests = [e.payload[n:] for e, n in zip(batch, prefix_lengths)]
        rest_ids, rest_mask = pad_right(rests, pad, self.device)
        lengths = torch.tensor(prefix_lengths, device=self.device)
        # Each row sees its own prefix's real tokens (the rest of the padded prefix width is
        # masked), then its own tokens, at the positions they hold in the unshared sequence.
        seen = torch.arange(prefix_ids.shape[1], device=self.device)[None, :] < lengths[:, None]
        mask = torch.cat([seen.to(rest_mask.dtype), rest_mask], dim=1)
        positions = lengths[:, None] + torch.arange(rest_ids.shape[1], device=self.device)[None, :]
        hidden = self._base_model(input_ids=rest_ids, attention_mask=mask, position_ids=positions,
                                  use_cache=True, **{self._cache_kwarg: cache}).last_hidden_state
        pooled = torch.tensor([_last_non_pad(rest, pad) for rest in rests], device=self.device)
        picked = hidden[torch.arange(len(batch), device=self.device), pooled]
        head = self.model.get_submodule("score")  # GenericForSequenceClassification's head
        return head(picked)[:, 0].float().cpu().tolist()


def prefix_sharing_unsupported(model: PreTrainedModel) -> str | None:
    """Why computing a shared prefix apart would not be exact for ``model`` (None: it is)."""
    try:
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:  # transformers before the shared decoder classification head
        return "this transformers version has no GenericForSequenceClassification"
    if not isinstance(model, GenericForSequenceClassification):
        return (f"{type(model).__name__} is not a causal decoder pooling its last token "
                "(e.g. an encoder such as BERT)")
    if not getattr(model.config, "is_causal", True):
        return "the decoder is configured with bidirectional attention"
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention kernel {attention!r} (prefix sharing needs sdpa or eager)"
    layers = DynamicCache(config=model.config).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        # Sliding windows measure distance in the padded layout; linear attention has no K/V.
        return "not every layer is plain full attention"
    return None


def _last_non_pad(ids: Sequence[int], pad_id: int) -> int:
    """The position the classification head pools: the last token that is not the pad token
    (-1: none), as ``GenericForSequenceClassification`` picks it."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_id:
            return i
    return -1


def _text(value: object) -> str:
    """What the tokenizer returns for one text (its stubs allow a list or an encoding too)."""
    if not isinstance(value, str):
        raise TypeError(f"the tokenizer returned {type(value).__name__}, not text")
    return value
