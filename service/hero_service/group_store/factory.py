"""The group store the settings ask for (``--group-store``, ``HERO_GROUP_STORE``)."""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlsplit

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


def _check_redis_url(url: str) -> None:
    """What redis-py would only find on the first connection, or not at all (a database path
    it ignores), as a start-up error; the message never shows the URL's userinfo or query."""
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname or ''}"
    try:
        parts.port  # noqa: B018  (parsing it is the check)
    except ValueError:
        raise ValueError(f"group_store {shown}...: the port is not a number") from None
    if not parts.hostname:
        raise ValueError(f"group_store {url.split('://', 1)[0]}://...: no host")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"group_store {shown}: the path must be a database number "
                         f"(redis://host:port/0), got /{db}")


def check_group_store_settings(settings: Settings) -> None:
    """Raise ``ValueError`` (one line, nothing secret) for a group store setting that cannot
    work: a bad URL, an unreadable password file. Cheap: run before the model loads."""
    target = settings.group_store.strip()
    if target == "memory":
        return
    if not target.startswith(("redis://", "rediss://")):
        shown = target.split("://", 1)[0] + "://..." if "://" in target else repr(target)
        raise ValueError(f"group_store must be 'memory' or a redis:// or rediss:// URL, got "
                         f"{shown}")
    _check_redis_url(target)
    resolved_password(settings)


def create_group_store(settings: Settings, **options: Any) -> GroupStore:
    """``memory`` or a Redis store; ``options`` go to the store (timeouts, bounds, sigma rule).
    Call ``await store.start()`` before use: it reports an unreachable Redis."""
    check_group_store_settings(settings)
    options.setdefault("timeout_s", settings.group_timeout_s)
    options.setdefault("max_waiting", settings.max_queued_rollouts)
    target = settings.group_store.strip()
    if target == "memory":
        return MemoryGroupStore(**options)
    from .redis import RedisGroupStore  # redis-py is needed only for this store

    return RedisGroupStore(target, password=resolved_password(settings), **options)
