"""Group store: where groups assembled across requests and replicas meet (see base.py)."""

from .base import (
    ClosedGroup, Combine, GroupKey, GroupScoringFailed, GroupStore, GroupStoreOverloaded,
    GroupStoreUnavailable, Member, MemberOutcome, SigmaRule, StoreStats,
)
from .memory import MemoryBackend, MemoryGroupStore

__all__ = [
    "ClosedGroup", "Combine", "GroupKey", "GroupScoringFailed", "GroupStore",
    "GroupStoreOverloaded", "GroupStoreUnavailable", "Member", "MemberOutcome", "MemoryBackend",
    "MemoryGroupStore", "SigmaRule", "StoreStats",
]
