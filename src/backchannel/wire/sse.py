"""Server-sent events (the ``text/event-stream`` format of the WHATWG HTML standard).

The encoder turns a message into one event, once, whatever the number of subscribers:

    id: 000000000000002a
    data: {"id":"000000000000002a","channel":"news",…}

A ``data`` value spanning several lines becomes several ``data:`` lines (the reader joins them
with ``\\n``). Comments (``: …``) keep idle connections alive; ``retry:`` tells the browser how
long to wait before it reconnects.

:class:`EventParser` is the reading side, sans-I/O like the rest of this package: feed it bytes
with :meth:`~EventParser.receive_data`, take complete :class:`Event` objects from
:meth:`~EventParser.events`. It follows the standard's parsing rules (any of CRLF, LF or CR ends
a line, a leading BOM is skipped, unknown fields are ignored) and bounds what it buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTENT_TYPE = b"text/event-stream"
MAX_LINE_BYTES = 4 << 20
_LINE_BREAKS = ("\r\n", "\r", "\n")


def _check_single_line(name: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE {name} cannot contain a line break")


def encode_event(data: str, *, id: str | None = None, event: str | None = None) -> bytes:
    """One event: optional ``event:`` and ``id:`` fields, then ``data:`` lines."""
    parts: list[str] = []
    if event is not None:
        _check_single_line("event name", event)
        parts.append(f"event: {event}\n")
    if id is not None:
        _check_single_line("id", id)
        if "\0" in id:
            raise ValueError("an SSE id cannot contain NUL")
        parts.append(f"id: {id}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """A comment line, ignored by readers: a heartbeat."""
    _check_single_line("comment", text)
    return f": {text}\n\n".encode() if text else b":\n\n"


def encode_retry(milliseconds: int) -> bytes:
    """The ``retry:`` field: how long a browser waits before reconnecting."""
    if milliseconds < 0:
        raise ValueError("retry must not be negative")
    return f"retry: {milliseconds}\n\n".encode()


@dataclass(frozen=True, slots=True)
class Event:
    """An event as a reader dispatches it. ``id`` is the last event id in force, as the standard
    defines it (it carries over events without an ``id:`` field)."""

    data: str
    event: str = "message"
    id: str = ""


class EventStreamTooLong(ValueError):
    """The peer sent a line or an event larger than the parser's limit."""


class EventParser:
    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._buffer = ""
        self._decoder_tail = b""
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._ready: list[Event] = []
        self._after_cr = False
        self.retry: int | None = None  # the reconnection time the stream asked for, if any

    @property
    def last_event_id(self) -> str:
        return self._last_id

    def receive_data(self, data: bytes) -> None:
        data = self._decoder_tail + data
        # Keep an incomplete UTF-8 sequence for the next call.
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if byte & 0xC0 == 0x80:
                continue
            if byte >= 0xC0:
                width = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
                if width > back:
                    cut = len(data) - back
            break
        self._decoder_tail = data[cut:]
        text = data[:cut].decode("utf-8", errors="replace")
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        self._buffer += text
        self._split_lines()
        if len(self._buffer) > self._max or sum(map(len, self._data)) > self._max:
            raise EventStreamTooLong(f"an SSE line or event passed {self._max} bytes")

    def _split_lines(self) -> None:
        buffer = self._buffer
        start = 0
        if self._after_cr and buffer.startswith("\n"):
            start = 1  # the LF of a CRLF split across two reads
        self._after_cr = False
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 or 0 <= lf < cr else cr
            self._line(buffer[start:end])
            if buffer[end] == "\r":
                if end + 1 == len(buffer):
                    self._after_cr = True  # a CR ends the line at once; skip an LF that follows
                    start = end + 1
                    break
                start = end + 2 if buffer[end + 1] == "\n" else end + 1
            else:
                start = end + 1
        self._buffer = buffer[start:]

    def _line(self, line: str) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)

    def _dispatch(self) -> None:
        if self._data:
            data = "\n".join(self._data)
            self._ready.append(Event(data, self._event or "message", self._last_id))
        self._data = []
        self._event = ""

    def events(self) -> list[Event]:
        """The events completed so far (each returned once)."""
        ready, self._ready = self._ready, []
        return ready
