"""Implementations of :class:`backchannel.core.Store`, and :func:`open_store` to pick one by URL.

=================================== ==========================================================
URL                                 store
=================================== ==========================================================
``sqlite:///path/to/file.db``       :class:`SQLiteStore`, durable, one process (the default)
``sqlite:///:memory:``              refused: use ``memory://``
``memory://``                       :class:`MemoryStore`, nothing survives a restart
``redis://host:port/db?prefix=P``   :class:`RedisStore`, shared by many hub processes; all
                                    keys under ``P:`` (default ``backchannel``). Also
``rediss://`` (TLS) and             ``unix:///path/redis.sock?db=0&prefix=P``. Other query
                                    options go to redis-py (``max_connections``,
                                    ``socket_timeout``, ...). Needs ``backchannel[redis]``.
=================================== ==========================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..core.channels import Retention
from ..core.store import Store
from .base import DEFAULT_IDEMPOTENCY_TTL_MS, DEFAULT_RETENTION, shown_url
from .memory import MemoryStore
from .sqlite import SQLiteStore, StoreLocked

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "SQLiteStore", "StoreLocked", "open_store", "shown_url"]
REDIS_SCHEMES = ("redis", "rediss", "unix")


def __getattr__(name: str) -> Any:
    # The Redis store needs the optional redis package: imported only when asked for.
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(name)


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
    if parts.scheme in REDIS_SCHEMES:
        return _redis_store(url, retention, idempotency_ttl_ms)
    raise ValueError(
        f"{url!r}: unknown store; use sqlite:///path/to/file.db, memory:// or redis://host:port/db"
    )


def _redis_store(url: str, retention: Retention, idempotency_ttl_ms: int) -> Store:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    try:
        from .redis import DEFAULT_PREFIX, RedisStore
    except ImportError:
        raise ValueError(
            f"{url!r} needs the redis package: pip install 'backchannel[redis]'"
        ) from None
    return RedisStore(
        urlunsplit(parts._replace(query=rest)),
        prefix=prefixes[-1] if prefixes else DEFAULT_PREFIX,
        retention=retention,
        idempotency_ttl_ms=idempotency_ttl_ms,
    )
