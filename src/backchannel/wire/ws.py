"""WebSocket frames as a server writes them (RFC 6455, section 5.2), for pushed messages.

The ASGI server owns the WebSocket connection: the handshake, reading, pings, closing. This
module only builds the unmasked, unfragmented text frames a server sends, so that a message's
frame can be encoded once and written to every subscriber as it is (see
``backchannel.server.fastpath``), and the close frame written behind them when a slow consumer
is cut.
"""

from __future__ import annotations

import struct

_OP_TEXT_FINAL = 0x81
_OP_CLOSE_FINAL = 0x88
#: A control frame's payload is at most 125 bytes: the code (2) and up to 123 of reason.
MAX_CLOSE_REASON = 123
_U16 = struct.Struct("!BBH")
_U64 = struct.Struct("!BBQ")


def text_frame_header(length: int) -> bytes:
    """The header of a final, unmasked text frame whose payload has ``length`` bytes."""
    if length < 0:
        raise ValueError("a frame's length cannot be negative")
    if length < 126:
        return bytes((_OP_TEXT_FINAL, length))
    if length < 1 << 16:
        return _U16.pack(_OP_TEXT_FINAL, 126, length)
    if length < 1 << 63:
        return _U64.pack(_OP_TEXT_FINAL, 127, length)
    raise ValueError("a frame's payload must be shorter than 2**63 bytes")


def text_frame(payload: bytes) -> bytes:
    """A whole server text frame carrying ``payload`` (UTF-8 text)."""
    return text_frame_header(len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A server close frame with ``code`` and ``reason`` (cut to 123 bytes of UTF-8, on a
    character boundary)."""
    if not 1000 <= code <= 4999:
        raise ValueError(f"{code} is not a close code that may be sent")
    text = reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore").encode()
    payload = code.to_bytes(2, "big") + text
    return bytes((_OP_CLOSE_FINAL, len(payload))) + payload
