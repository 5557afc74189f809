"""Messages as the core and the stores see them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ..wire import format_id
from ..wire.jsonfmt import encode_message


@dataclass(frozen=True, kw_only=True)
class Message:
    """One message of a channel's log. ``seq`` is its position (1, 2, …) in the channel."""

    channel: str
    seq: int
    time_ms: int
    content_type: str
    data: bytes = field(repr=False)

    @property
    def id(self) -> str:
        return format_id(self.seq)

    @cached_property
    def json(self) -> bytes:
        """The message as a JSON object, encoded once however many readers it has."""
        return encode_message(self.channel, self.seq, self.time_ms, self.content_type, self.data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Draft:
    """A message to append. ``digest`` fingerprints the body so that an idempotency key reused
    for a different message is told apart from a retry."""

    content_type: str
    data: bytes
    idempotency_key: str | None = None
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class Appended:
    """The outcome of an append: the message, and whether it was stored earlier under the same
    idempotency key (a replay) rather than now."""

    message: Message
    replayed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelStats:
    last_seq: int
    first_seq: int  # of the oldest retained message; last_seq + 1 when none is retained
    retained: int
