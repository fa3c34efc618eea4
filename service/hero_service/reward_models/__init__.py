"""Reward-model backends behind one interface (:class:`RewardModel`)."""

from __future__ import annotations

from .base import Encoded, RewardModel, RewardModelError, ScoringItem

__all__ = ["Encoded", "RewardModel", "RewardModelError", "ScoringItem", "load_reward_model"]


def load_reward_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int = 0,
    trust_remote_code: bool = False,
    remote_timeout_s: float = 30.0,
    share_prompts: bool = True,
) -> RewardModel:
    """Build the backend named by ``spec``: ``embedded``, ``hf:PATH`` or ``remote:URL``.
    ``share_prompts``: let the hf backend encode a group's shared prompt once (where exact)."""
    if spec == "embedded":
        from .embedded import EmbeddedRewardModel

        return EmbeddedRewardModel(device=device, max_length=max_length)
    if spec.startswith("hf:"):
        from .hf import HFRewardModel

        return HFRewardModel(
            spec[3:], device=device, dtype=dtype, max_length=max_length,
            trust_remote_code=trust_remote_code, share_prompts=share_prompts,
        )
    if spec.startswith("remote:"):
        from .remote import RemoteRewardModel

        return RemoteRewardModel(spec[7:], timeout_s=remote_timeout_s, max_length=max_length)
    raise ValueError(f"unknown reward model {spec!r}: use embedded, hf:PATH or remote:URL")
