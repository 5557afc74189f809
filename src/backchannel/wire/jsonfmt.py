"""JSON encodings of messages, built from bytes so a JSON body is embedded exactly as published.

:func:`encode_message` is called once per message; the result is joined into poll answers (and,
later, pushed frames) without encoding the message again.
"""

from __future__ import annotations

import base64
import functools
from datetime import UTC, datetime

import orjson

from .cursor import format_id
from .payload import Encoding, encoding_for


@functools.lru_cache(maxsize=4096)
def format_time(time_ms: int) -> str:
    """RFC 3339 UTC time with milliseconds, e.g. ``2026-11-28T04:43:05.123Z``.

    Cached: times come in runs (the jobs of a batch, a burst of messages)."""
    return f"{_second(time_ms // 1000)}{time_ms % 1000:03d}Z"


@functools.lru_cache(maxsize=1024)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def encode_message(channel: str, seq: int, time_ms: int, content_type: str, data: bytes) -> bytes:
    """The JSON object for one message: id, channel, time, content_type, encoding, data."""
    encoding = encoding_for(content_type)
    if encoding is Encoding.JSON:
        # Validated at publish time; strip only insignificant surrounding whitespace.
        body = data.strip()
    elif encoding is Encoding.TEXT:
        body = orjson.dumps(data.decode("utf-8"))
    else:
        body = orjson.dumps(base64.b64encode(data).decode("ascii"))
    head = orjson.dumps(
        {
            "id": format_id(seq),
            "channel": channel,
            "time": format_time(time_ms),
            "content_type": content_type,
            "encoding": encoding.value,
        }
    )
    return head[:-1] + b',"data":' + body + b"}"


def encode_page(messages: list[bytes], next_after: str) -> bytes:
    """A poll answer from already encoded messages."""
    return (
        b'{"messages":['
        + b",".join(messages)
        + b'],"next_after":'
        + orjson.dumps(next_after)
        + b"}"
    )
