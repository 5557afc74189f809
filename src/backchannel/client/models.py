"""What the client returns: messages, pages, publish results. Plain frozen dataclasses."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson

from ..wire import format_id
from ..wire.jsonfmt import format_time
from ..wire.payload import Encoding, encoding_for
from .errors import ProtocolViolation


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """A message as published: ``data`` is the JSON value (``encoding == "json"``), the text
    (``"text"``) or the bytes (``"base64"``)."""

    id: str
    channel: str
    time: str
    content_type: str
    encoding: str
    data: Any

    @property
    def seq(self) -> int:
        return int(self.id, 16)

    @classmethod
    def from_document(cls, document: Any) -> Message:
        try:
            encoding = document["encoding"]
            data = document["data"]
            if encoding == "base64":
                data = base64.b64decode(data)
            return cls(
                id=document["id"],
                channel=document["channel"],
                time=document["time"],
                content_type=document["content_type"],
                encoding=encoding,
                data=data,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolViolation(f"not a message: {str(document)[:200]}") from exc

    @classmethod
    def from_frame(
        cls, channel: str, seq: int, time_ms: int, content_type: str, body: bytes
    ) -> Message:
        """From the parts of a TCP MESSAGE frame (raw bytes and content type)."""
        encoding = encoding_for(content_type)
        data: Any = body
        try:
            if encoding is Encoding.JSON:
                data = orjson.loads(body)
            elif encoding is Encoding.TEXT:
                data = body.decode()
        except ValueError as exc:
            raise ProtocolViolation(f"message {seq} does not match its content type") from exc
        return cls(
            id=format_id(seq),
            channel=channel,
            time=format_time(time_ms),
            content_type=content_type,
            encoding=encoding.value,
            data=data,
        )


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[Message]
    next_after: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    id: str
    channel: str
    time: str
    replayed: bool = False  # an earlier publish with the same Idempotency-Key
