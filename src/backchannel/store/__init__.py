"""Implementations of :class:`backchannel.core.Store`, and :func:`open_store` to pick one by URL.

============================== ===============================================================
URL                            store
============================== ===============================================================
``sqlite:///path/to/file.db``  :class:`SQLiteStore`, durable, one process (the default)
``sqlite:///:memory:``         refused: use ``memory://``
``memory://``                  :class:`MemoryStore`, nothing survives a restart
============================== ===============================================================
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import unquote, urlsplit

from ..core.channels import Retention
from ..core.store import Store
from .base import DEFAULT_IDEMPOTENCY_TTL_MS, DEFAULT_RETENTION
from .memory import MemoryStore
from .sqlite import SQLiteStore, StoreLocked

__all__ = ["MemoryStore", "SQLiteStore", "StoreLocked", "open_store"]


def open_store(
    url: str,
    *,
    retention: Retention = DEFAULT_RETENTION,
    idempotency_ttl_ms: int = DEFAULT_IDEMPOTENCY_TTL_MS,
    sqlite_synchronous: Literal["normal", "full"] = "normal",
) -> Store:
    """The store a URL names (not yet opened). Raises ``ValueError`` for an unusable URL."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return MemoryStore(retention=retention, idempotency_ttl_ms=idempotency_ttl_ms)
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise ValueError(
                f"{url!r}: a SQLite URL has no host; write sqlite:///relative.db or "
                "sqlite:////absolute/path.db"
            )
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path or path == ":memory:":
            raise ValueError(f"{url!r} names no file; use memory:// for a store in memory")
        return SQLiteStore(
            path,
            retention=retention,
            idempotency_ttl_ms=idempotency_ttl_ms,
            synchronous=sqlite_synchronous,
        )
    raise ValueError(f"{url!r}: unknown store; use sqlite:///path/to/file.db or memory://")
