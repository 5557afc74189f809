"""WebSocket frames as a server writes them (RFC 6455, section 5.2), for pushed messages.

The ASGI server owns the WebSocket connection: the handshake, reading, pings, closing. This
module only builds the unmasked, unfragmented text frames a server sends, so that a message's
frame can be encoded once and written to every subscriber as it is (see
``backchannel.server.fastpath``).
"""

from __future__ import annotations

import struct

_OP_TEXT_FINAL = 0x81
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
