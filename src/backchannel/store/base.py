"""Defaults shared by every store implementation."""

from urllib.parse import urlsplit, urlunsplit

from ..core.channels import Retention

DEFAULT_RETENTION = Retention(max_count=10_000, max_age_ms=24 * 3600 * 1000)
DEFAULT_IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000


def shown_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and the start-up line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
