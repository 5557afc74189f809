"""Channel names and retention policies."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidRequest

MAX_CHANNEL_LENGTH = 200
MAX_RETENTION_COUNT = 1_000_000_000
MAX_RETENTION_AGE_MS = 10 * 365 * 86_400_000
_CHANNEL = re.compile(r"[A-Za-z0-9_\-.:@]{1,200}")


def validate_channel(name: str) -> str:
    """Return ``name`` if it is a valid channel name, else raise ``invalid-channel``."""
    if _CHANNEL.fullmatch(name) is None:
        shown = name if len(name) <= 60 else name[:60] + "…"
        raise InvalidRequest(
            "invalid-channel",
            f"{shown!r} is not a channel name: use 1 to {MAX_CHANNEL_LENGTH} letters, digits "
            "and _ - . : @",
        )
    return name


def check_retention(max_count: int | None, max_age_ms: int | None) -> None:
    """Raise ``invalid-retention`` unless each given limit is within bounds."""
    if max_count is not None and not 1 <= max_count <= MAX_RETENTION_COUNT:
        raise InvalidRequest(
            "invalid-retention", f"max_count must be between 1 and {MAX_RETENTION_COUNT}"
        )
    if max_age_ms is not None and not 1000 <= max_age_ms <= MAX_RETENTION_AGE_MS:
        raise InvalidRequest("invalid-retention", "max_age must be between 1 second and 10 years")


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How much history a channel keeps: at most ``max_count`` messages, none older than
    ``max_age_ms``. Whichever limit is stricter wins; both apply to reads at once, and the
    store deletes what they hide in its own time."""

    max_count: int
    max_age_ms: int

    def __post_init__(self) -> None:
        check_retention(self.max_count, self.max_age_ms)

    def override(self, max_count: int | None, max_age_ms: int | None) -> Retention:
        """This policy with a channel's own limits, where it has them, in place of these."""
        return Retention(
            max_count=self.max_count if max_count is None else max_count,
            max_age_ms=self.max_age_ms if max_age_ms is None else max_age_ms,
        )
