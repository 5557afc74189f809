"""Messages as the core and the stores see them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ..wire import format_id
from ..wire.frames import encode_message as encode_tcp_message
from ..wire.jsonfmt import encode_message
from ..wire.sse import encode_event
from ..wire.ws import text_frame


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

    # Each wire form is encoded the first time a subscriber needs it and then shared by every
    # subscriber of that form: a message is encoded once per wire format, not once per reader.

    @cached_property
    def json(self) -> bytes:
        """The message as a JSON object (polls, one-channel WebSocket frames)."""
        return encode_message(self.channel, self.seq, self.time_ms, self.content_type, self.data)

    @cached_property
    def sse(self) -> bytes:
        """The message as one server-sent event: its id, and its JSON as data."""
        return b"id: " + self.id.encode() + b"\n" + self.sse_data

    @cached_property
    def sse_data(self) -> bytes:
        """The event without its id line, for streams whose ids are composite."""
        # JSON from orjson has no raw line breaks, but a JSON body embedded verbatim may.
        body = self.json
        if b"\n" in body or b"\r" in body:
            return encode_event(body.decode())
        return b"data: " + body + b"\n\n"

    @cached_property
    def tcp(self) -> bytes:
        """The message as a MESSAGE frame of the TCP protocol."""
        return encode_tcp_message(
            self.channel, self.seq, self.time_ms, self.content_type, self.data
        )

    @cached_property
    def mux_json(self) -> bytes:
        """The message as pushed on the multiplexed WebSocket."""
        return b'{"op":"message","message":' + self.json + b"}"

    @cached_property
    def ws_frame(self) -> bytes:
        """:attr:`json` as a whole WebSocket text frame, for direct writes."""
        return text_frame(self.json)

    @cached_property
    def mux_ws_frame(self) -> bytes:
        """:attr:`mux_json` as a whole WebSocket text frame, for direct writes."""
        return text_frame(self.mux_json)


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
