"""How a published body travels inside JSON documents.

A message keeps its bytes and its content type exactly as published. When a message is put
inside a JSON document (a poll answer, later an SSE or WebSocket frame), its ``encoding`` says
how ``data`` holds those bytes:

======== ================================================= ==============================
encoding content types                                      ``data`` is
======== ================================================= ==============================
json     ``application/json``, any ``*/*+json``              the JSON value itself
text     ``text/*``, ``application/x-www-form-urlencoded``   a string (the body is UTF-8)
base64   everything else, and a missing content type         the bytes in standard base64
======== ================================================= ==============================

:func:`validate_payload` refuses bodies that do not match their declared type, so a JSON
message can always be embedded verbatim and a text message always decodes.
"""

from __future__ import annotations

import enum
import json

import orjson

DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_CONTENT_TYPE_LENGTH = 200
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


class Encoding(enum.Enum):
    JSON = "json"
    TEXT = "text"
    BASE64 = "base64"


class InvalidPayload(ValueError):
    """A body does not match its content type. ``kind`` names the problem."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "malformed-json" | "invalid-text" | "unsupported-media-type"
        self.detail = detail


def _split(content_type: str) -> tuple[str, str | None]:
    """The media type (lowercased) and the charset parameter, if any."""
    media, _, params = content_type.partition(";")
    charset = None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media.strip().lower(), charset


def encoding_for(content_type: str) -> Encoding:
    """How a body of ``content_type`` is carried in JSON documents."""
    media, _ = _split(content_type)
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return Encoding.JSON
    if media.startswith("text/") or media == "application/x-www-form-urlencoded":
        return Encoding.TEXT
    return Encoding.BASE64


def normalize_content_type(content_type: str | None) -> str:
    """The content type to store: as given, or :data:`DEFAULT_CONTENT_TYPE` when missing."""
    if content_type is None or not content_type.strip():
        return DEFAULT_CONTENT_TYPE
    content_type = content_type.strip()
    if len(content_type) > MAX_CONTENT_TYPE_LENGTH or not content_type.isprintable():
        raise InvalidPayload("unsupported-media-type", "the Content-Type header is not valid")
    media, _ = _split(content_type)
    if media.count("/") != 1 or " " in media:
        raise InvalidPayload(
            "unsupported-media-type", f"{media!r} is not a media type (expected type/subtype)"
        )
    return content_type


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def _check_json(data: bytes) -> None:
    try:
        orjson.loads(data)
        return
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
    # orjson refuses integers beyond 64 bits, which JSON allows: ask the standard library,
    # strictly (UTF-8 only, no NaN or Infinity), before refusing.
    try:
        json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidPayload("malformed-json", f"the body is not valid JSON: {reason}") from None


def validate_payload(content_type: str, data: bytes) -> Encoding:
    """Check ``data`` against ``content_type`` and return its :class:`Encoding`."""
    encoding = encoding_for(content_type)
    if encoding is Encoding.BASE64:
        return encoding
    _, charset = _split(content_type)
    if charset is not None and charset not in _UTF8_CHARSETS:
        raise InvalidPayload(
            "unsupported-media-type",
            f"charset {charset!r} is not supported for {encoding.value} messages: send UTF-8, "
            "or send the body as application/octet-stream",
        )
    if encoding is Encoding.JSON:
        _check_json(data)
        return encoding
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(
            "invalid-text", f"a text body must be UTF-8: invalid byte at offset {exc.start}"
        ) from None
    return encoding
