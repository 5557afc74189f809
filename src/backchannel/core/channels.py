"""Channel names and retention policies."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidRequest

MAX_CHANNEL_LENGTH = 200
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How much history a channel keeps: at most ``max_count`` messages, none older than
    ``max_age_ms``. Whichever limit is stricter wins."""

    max_count: int
    max_age_ms: int

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise InvalidRequest("invalid-retention", "max_count must be at least 1")
        if self.max_age_ms < 1000:
            raise InvalidRequest("invalid-retention", "max_age must be at least 1 second")
