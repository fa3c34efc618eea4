"""The group store the settings ask for (``--group-store``, ``HERO_GROUP_STORE``)."""

from __future__ import annotations

from typing import Any, Optional

from ..config import Settings
from .base import GroupStore
from .memory import MemoryGroupStore


def resolved_password(settings: Settings) -> Optional[str]:
    """The Redis password: ``group_store_password``, else the file's first line stripped (a
    mounted Kubernetes Secret), else None (then a password in the URL, if any, is used)."""
    if settings.group_store_password is not None:
        value = settings.group_store_password.get_secret_value()
        if value:
            return value
    path = settings.group_store_password_file
    if path is not None:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"group_store_password_file {path}: cannot read it "
                             f"({exc.strerror or exc})") from exc
        if not value:
            raise ValueError(f"group_store_password_file {path} is empty")
        return value
    return None


def create_group_store(settings: Settings, **options: Any) -> GroupStore:
    """``memory`` or a Redis store; ``options`` go to the store (timeouts, bounds, sigma rule).
    Call ``await store.start()`` before use: it reports an unreachable Redis."""
    options.setdefault("timeout_s", settings.group_timeout_s)
    options.setdefault("max_waiting", settings.max_queued_rollouts)
    target = settings.group_store.strip()
    if target == "memory":
        return MemoryGroupStore(**options)
    if target.startswith(("redis://", "rediss://")):
        from .redis import RedisGroupStore  # redis-py is needed only for this store

        return RedisGroupStore(target, password=resolved_password(settings), **options)
    from .redis import display_url

    raise ValueError("group_store must be 'memory' or a redis:// or rediss:// URL, got "
                     f"{display_url(target) if '://' in target else target!r}")
