"""Sans-I/O codecs: pure functions over bytes and strings, with no asyncio and no sockets.

- :mod:`.cursor` formats and parses message ids (the cursors clients keep).
- :mod:`.payload` decides how a published body is carried (JSON, text or base64) and checks it.
- :mod:`.jsonfmt` encodes messages and pages as JSON bytes, once per message.
"""

from .cursor import BEGINNING, InvalidCursor, format_id, parse_id
from .payload import Encoding, InvalidPayload, encoding_for, validate_payload

__all__ = [
    "BEGINNING",
    "Encoding",
    "InvalidCursor",
    "InvalidPayload",
    "encoding_for",
    "format_id",
    "parse_id",
    "validate_payload",
]
