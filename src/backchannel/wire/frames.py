"""The TCP binary protocol, versions 1 and 2: frames, their codec and the connection state
machine. Version 2 is version 1 plus the AUTH frame, which carries a bearer token.

This module owns the byte layout of every frame (``docs/protocol.md``, "TCP binary protocol,
version 1") and the rules of a connection: which side may send which frame in which state, and
version negotiation. It does no I/O, in the h11 manner:

- :func:`encode` turns one frame into bytes; :func:`encode_message` does the same for MESSAGE,
  the hot path (encoded once per published message, then written to every subscriber).
- :class:`Connection` is one side of one connection. :meth:`~Connection.receive_data` only
  buffers; :meth:`~Connection.next_event` parses one frame per call and returns it, or
  :data:`NEED_DATA`, or :data:`CONNECTION_CLOSED` once the peer has closed cleanly;
  :meth:`~Connection.send` checks a frame against the state machine and returns its bytes.
- The legal moves are the table :data:`TRANSITIONS`, ``{(sender role, state, frame class):
  next state}``, read for frames we send and frames we receive alike. A move missing from it is
  a :class:`LocalProtocolError` when we send, a :class:`RemoteProtocolError` when we receive.

Exceptions::

    ProtocolError                 .error_type: the problem slug to put in an ERROR frame
    ├── RemoteProtocolError       the peer sent something invalid; the connection is CLOSED
    └── LocalProtocolError        our own misuse; nothing was sent and the state is unchanged

States (both roles start in AWAITING_HELLO)::

    AWAITING_HELLO --HELLO--> AWAITING_WELCOME --WELCOME--> OPEN
          any state --ERROR with request 0, peer EOF, RemoteProtocolError--> CLOSED

Where the spec is silent or inconsistent, this module decides:

1. ``length`` counts the type byte and the body, as the "Frames" section says. The example at
   the end of the spec gives HELLO, WELCOME and SUBSCRIBE lengths one larger than that rule
   (``00000008`` for a 7-byte HELLO, ``00000015`` for a 20-byte SUBSCRIBE); its OK line agrees
   with the rule. We follow the rule; the example is wrong.
2. Request 0 is reserved for ERROR about the connection. SUBSCRIBE, UNSUBSCRIBE, PUBLISH, PING
   and their answers OK, PUBLISHED, PONG carry requests 1 to 2**32 - 1, so that an ERROR
   answering a refused command can never be mistaken for a connection-level one. Sending 0 is a
   LocalProtocolError, receiving it a RemoteProtocolError. Request ids are echoed, not tracked:
   the codec does not check that an answer matches a pending command.
3. An ERROR with request 0 ends the connection (the spec has the server close after each one):
   whoever sends or receives it goes CLOSED. The server may send one such ERROR in any state,
   including CLOSED, so that it can report the RemoteProtocolError that closed the connection
   (``protocol-error``, ``frame-too-large``, ``unsupported-version``). An ERROR with another
   request is only legal once OPEN, and leaves it OPEN.
4. ``idempotency_key`` is ``None`` on the wire as the empty string, so sending ``""`` is a
   LocalProtocolError (it would come back as ``None``).
5. ``max_frame`` limits what a connection receives. The client learns the server's limit from
   WELCOME and :meth:`~Connection.send` refuses larger frames (``frame-too-large``); the server
   is never told the client's limit. A MESSAGE is up to 10 bytes longer than the PUBLISH that
   made it (seq and time_ms replace request and an empty key), so the server application must
   keep payloads below its limit with room to spare (1 MiB of data against 1 MiB + 64 KiB).
   The WELCOME the server sends may not announce more than its own ``max_frame``.
6. A client's HELLO offers a non-empty subset of the connection's ``versions``; WELCOME must
   pick one of the offered versions and ``Connection.version`` is then that one (else
   RemoteProtocolError ``unsupported-version``). The server's WELCOME must carry the version it
   chose. A HELLO with no version in common (an empty list included) is a RemoteProtocolError
   ``unsupported-version`` on the server.
7. A frame of the other direction (the server receiving 0x81) is treated as an unknown type.
8. ``seq``, ``after`` and ``time_ms`` are checked against the u64 wire range only; the store's
   own limit (2**63 - 1, see :mod:`.cursor`) is the application's business.
9. The peer closing in the middle of a frame is a RemoteProtocolError (``protocol-error``);
   closing between frames makes :meth:`~Connection.next_event` return CONNECTION_CLOSED.
   Once CLOSED, received data is discarded and ``next_event`` returns CONNECTION_CLOSED again,
   or raises again the RemoteProtocolError that closed the connection.
10. AUTH exists from version 2 on: on a connection that negotiated version 1, sending it is a
   LocalProtocolError and receiving it a RemoteProtocolError (``protocol-error``), as for an
   unknown frame type. The codec does not limit how often it is sent: the server application
   decides (the hub takes one per connection).

Buffering: ``next_event`` is pull-based, so the caller decides how much is read from the
socket. ``receive_data`` refuses (LocalProtocolError) to add to a buffer that already holds more
than ``max_frame + 4`` bytes ``next_event`` has not consumed, more than any one frame can take:
it means the caller keeps feeding without draining. The buffer is therefore bounded by
``max_frame + 4`` plus one chunk. A length over ``max_frame`` is refused as soon as its four
bytes arrive, so a peer cannot make us buffer an oversized body. The parser walks the buffer by
offset through one memoryview (kept between calls, released before the buffer changes size) and
compacts the buffer once per ``receive_data`` call, not once per frame.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "AUTH_VERSION",
    "CONNECTION_CLOSED",
    "DEFAULT_MAX_FRAME",
    "MAGIC",
    "NEED_DATA",
    "TRANSITIONS",
    "VERSIONS",
    "Auth",
    "ClientFrame",
    "ClosingError",
    "Connection",
    "ConnectionClosed",
    "Error",
    "Event",
    "Frame",
    "FrameType",
    "Hello",
    "LocalProtocolError",
    "Message",
    "NeedData",
    "Ok",
    "Ping",
    "Pong",
    "ProtocolError",
    "Publish",
    "Published",
    "RemoteProtocolError",
    "Role",
    "ServerFrame",
    "State",
    "Subscribe",
    "Unsubscribe",
    "Welcome",
    "encode",
    "encode_message",
]

MAGIC: Final = b"BKCH"
VERSIONS: Final[tuple[int, ...]] = (1, 2)
#: The first version with the AUTH frame.
AUTH_VERSION: Final = 2
DEFAULT_MAX_FRAME: Final = (1 << 20) + (64 << 10)
_MAX_U32: Final = (1 << 32) - 1
_MAX_STR: Final = (1 << 16) - 1
_LENGTH_SIZE = 4  # the u32 length prefix, not counted in ``length``


class FrameType(enum.IntEnum):
    HELLO = 0x01
    SUBSCRIBE = 0x02
    UNSUBSCRIBE = 0x03
    PUBLISH = 0x04
    PING = 0x05
    AUTH = 0x06
    WELCOME = 0x81
    OK = 0x82
    PUBLISHED = 0x83
    PONG = 0x84
    MESSAGE = 0x85
    ERROR = 0x86


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = "NEED_DATA"


class ConnectionClosed(enum.Enum):
    """The type of :data:`CONNECTION_CLOSED`."""

    CONNECTION_CLOSED = "CONNECTION_CLOSED"


#: ``next_event()`` has no complete frame yet: read more and call ``receive_data()``.
NEED_DATA: Final = NeedData.NEED_DATA
#: ``next_event()`` after the peer closed between frames (or the connection ended otherwise).
CONNECTION_CLOSED: Final = ConnectionClosed.CONNECTION_CLOSED


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    AWAITING_WELCOME = "awaiting-welcome"
    OPEN = "open"
    CLOSED = "closed"


class ProtocolError(Exception):
    """A frame or a move the protocol does not allow. ``error_type`` is the problem slug:
    ``protocol-error``, ``frame-too-large`` or ``unsupported-version``."""

    def __init__(self, message: str, *, error_type: str = "protocol-error") -> None:
        super().__init__(message)
        self.error_type = error_type


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid. The connection is CLOSED; a server reports the error
    with ``Error(request=0, type=exc.error_type, detail=str(exc))`` and closes."""


class LocalProtocolError(ProtocolError):
    """We tried to send something invalid: a frame not allowed in this role or state, or a field
    out of range. Nothing was encoded and the connection's state is unchanged."""


# -- Frames -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """HELLO (client, first frame): the versions the client speaks."""

    versions: tuple[int, ...] = VERSIONS


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    """SUBSCRIBE: messages of ``channel`` after seq ``after``, or only new ones if ``None``."""

    request: int
    channel: str
    after: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    request: int
    channel: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    request: int
    channel: str
    content_type: str
    idempotency_key: str | None = None
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    request: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """AUTH (version 2): a bearer token for the rest of the connection; answered by OK."""

    request: int
    token: str

    def __repr__(self) -> str:
        return f"Auth(request={self.request!r}, token=<{len(self.token)} characters>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """WELCOME: the version chosen, the server's frame limit and its name."""

    version: int
    max_frame: int
    server: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok:
    """OK: answers SUBSCRIBE and UNSUBSCRIBE."""

    request: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    request: int
    seq: int
    time_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    request: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    channel: str
    seq: int
    time_ms: int
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """ERROR: ``request`` 0 is about the connection, which then closes."""

    request: int
    type: str
    detail: str


ClientFrame: TypeAlias = Hello | Subscribe | Unsubscribe | Publish | Ping | Auth
ServerFrame: TypeAlias = Welcome | Ok | Published | Pong | Message | Error
Frame: TypeAlias = ClientFrame | ServerFrame
#: What :meth:`Connection.next_event` returns.
Event: TypeAlias = Frame | NeedData | ConnectionClosed

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEADER = struct.Struct(">IB")  # length, type
_U64X2 = struct.Struct(">QQ")
_PUBLISHED = struct.Struct(">IQQ")
_WELCOME = struct.Struct(">BIH")  # version, max_frame, server's length
_MESSAGE_HEAD = struct.Struct(">IBH")  # length, type, channel's length
_MESSAGE_MID = struct.Struct(">QQH")  # seq, time_ms, content type's length
# type + channel length + seq + time_ms + content type length + data length
_MESSAGE_OVERHEAD = 1 + 2 + 8 + 8 + 2 + 4


# -- Encoding -----------------------------------------------------------------------------------


def _int(value: int, bits: int, name: str, low: int = 0) -> int:
    if not low <= value < 1 << bits:
        raise LocalProtocolError(f"{name} must be between {low} and {(1 << bits) - 1}: {value!r}")
    return value


def _request(value: int) -> bytes:
    return _U32.pack(_int(value, 32, "request", low=1))


def _str(value: str, name: str) -> bytes:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{name} is not encodable as UTF-8: {exc}") from None
    if len(raw) > _MAX_STR:
        raise LocalProtocolError(f"{name} is {len(raw)} bytes of UTF-8, over {_MAX_STR}")
    return _U16.pack(len(raw)) + raw


def _bytes_len(value: bytes, name: str) -> bytes:
    if len(value) > _MAX_U32:
        raise LocalProtocolError(f"{name} is {len(value)} bytes, over {_MAX_U32}")
    return _U32.pack(len(value))


def _frame(code: int, *parts: bytes) -> bytes:
    length = 1 + sum(map(len, parts))
    if length > _MAX_U32:
        raise LocalProtocolError(f"a frame of {length} bytes", error_type="frame-too-large")
    return b"".join((_HEADER.pack(length, code), *parts))


def encode(frame: Frame) -> bytes:
    """The bytes of one frame, length prefix included. Fields out of range (a string over 65535
    bytes of UTF-8, a request outside 1..2**32-1, a seq outside u64…) raise
    :class:`LocalProtocolError`."""
    match frame:
        case Hello(versions=versions):
            if len(versions) > 0xFF:
                raise LocalProtocolError(f"HELLO offers {len(versions)} versions, over 255")
            listed = bytes(_int(v, 8, "version") for v in versions)
            return _frame(FrameType.HELLO, MAGIC, _U8.pack(len(versions)), listed)
        case Subscribe(request=request, channel=channel, after=after):
            tail = b"\x00" if after is None else b"\x01" + _U64.pack(_int(after, 64, "after"))
            return _frame(FrameType.SUBSCRIBE, _request(request), _str(channel, "channel"), tail)
        case Unsubscribe(request=request, channel=channel):
            return _frame(FrameType.UNSUBSCRIBE, _request(request), _str(channel, "channel"))
        case Publish():
            if frame.idempotency_key == "":
                raise LocalProtocolError("idempotency_key '' means none on the wire: use None")
            return _frame(
                FrameType.PUBLISH,
                _request(frame.request),
                _str(frame.channel, "channel"),
                _str(frame.content_type, "content_type"),
                _str(frame.idempotency_key or "", "idempotency_key"),
                _bytes_len(frame.data, "data"),
                frame.data,
            )
        case Ping(request=request):
            return _frame(FrameType.PING, _request(request))
        case Auth(request=request, token=token):
            return _frame(FrameType.AUTH, _request(request), _str(token, "token"))
        case Welcome(version=version, max_frame=max_frame, server=server):
            _int(version, 8, "version")
            _int(max_frame, 32, "max_frame")
            return _frame(
                FrameType.WELCOME, bytes((version,)), _U32.pack(max_frame), _str(server, "server")
            )
        case Ok(request=request):
            return _frame(FrameType.OK, _request(request))
        case Published(request=request, seq=seq, time_ms=time_ms):
            return _frame(
                FrameType.PUBLISHED,
                _request(request),
                _U64.pack(_int(seq, 64, "seq")),
                _U64.pack(_int(time_ms, 64, "time_ms")),
            )
        case Pong(request=request):
            return _frame(FrameType.PONG, _request(request))
        case Message():
            return _frame(
                FrameType.MESSAGE,
                _str(frame.channel, "channel"),
                _U64.pack(_int(frame.seq, 64, "seq")),
                _U64.pack(_int(frame.time_ms, 64, "time_ms")),
                _str(frame.content_type, "content_type"),
                _bytes_len(frame.data, "data"),
                frame.data,
            )
        case Error(request=request, type=type_, detail=detail):
            return _frame(
                FrameType.ERROR,
                _U32.pack(_int(request, 32, "request")),
                _str(type_, "type"),
                _str(detail, "detail"),
            )
    raise LocalProtocolError(f"not a frame: {frame!r}")


def encode_message(channel: str, seq: int, time_ms: int, content_type: str, data: bytes) -> bytes:
    """The MESSAGE frame, equal to ``encode(Message(...))`` but built without the dataclass or
    the field-by-field checks: struct.pack does the range checks, and only on failure do we
    take the slow path for a precise error."""
    try:
        c = channel.encode()
        t = content_type.encode()
        return b"".join(
            (
                _MESSAGE_HEAD.pack(_MESSAGE_OVERHEAD + len(c) + len(t) + len(data), 0x85, len(c)),
                c,
                _MESSAGE_MID.pack(seq, time_ms, len(t)),
                t,
                _U32.pack(len(data)),
                data,
            )
        )
    except (struct.error, UnicodeEncodeError):
        message = Message(
            channel=channel, seq=seq, time_ms=time_ms, content_type=content_type, data=data
        )
        return encode(message)  # raises the LocalProtocolError that says which field


# -- Decoding -----------------------------------------------------------------------------------


class _Malformed(ValueError):
    """A body that does not match its frame's layout (turned into RemoteProtocolError)."""


def _read_str(body: memoryview, offset: int) -> tuple[str, int]:
    (size,) = _U16.unpack_from(body, offset)
    start = offset + 2
    stop = start + size
    if stop > len(body):
        raise _Malformed(f"a string of {size} bytes runs past the end of the body")
    return str(body[start:stop], "utf-8"), stop


def _read_data(body: memoryview, offset: int) -> tuple[bytes, int]:
    (size,) = _U32.unpack_from(body, offset)
    start = offset + 4
    stop = start + size
    if stop > len(body):
        raise _Malformed(f"data of {size} bytes runs past the end of the body")
    return bytes(body[start:stop]), stop


def _read_request(body: memoryview, offset: int = 0) -> int:
    request: int = _U32.unpack_from(body, offset)[0]
    if request == 0:
        raise _Malformed("request 0 is reserved for ERROR about the connection")
    return request


def _end(body: memoryview, offset: int) -> None:
    if offset < len(body):
        raise _Malformed(f"{len(body) - offset} trailing bytes")
    if offset > len(body):
        raise _Malformed(f"{offset - len(body)} bytes missing")


def _read_hello(body: memoryview) -> Hello:
    magic = body[:4].tobytes()
    if magic != MAGIC:
        raise _Malformed(f"magic is {magic!r}, not {MAGIC!r}")
    (count,) = _U8.unpack_from(body, 4)
    _end(body, 5 + count)
    return Hello(versions=tuple(body[5:]))


def _read_subscribe(body: memoryview) -> Subscribe:
    request = _read_request(body)
    channel, offset = _read_str(body, 4)
    (has_after,) = _U8.unpack_from(body, offset)
    if has_after == 0:
        _end(body, offset + 1)
        return Subscribe(request=request, channel=channel, after=None)
    if has_after != 1:
        raise _Malformed(f"has_after is {has_after}, not 0 or 1")
    (after,) = _U64.unpack_from(body, offset + 1)
    _end(body, offset + 9)
    return Subscribe(request=request, channel=channel, after=after)


def _read_unsubscribe(body: memoryview) -> Unsubscribe:
    request = _read_request(body)
    channel, offset = _read_str(body, 4)
    _end(body, offset)
    return Unsubscribe(request=request, channel=channel)


def _read_publish(body: memoryview) -> Publish:
    request = _read_request(body)
    channel, offset = _read_str(body, 4)
    content_type, offset = _read_str(body, offset)
    key, offset = _read_str(body, offset)
    data, offset = _read_data(body, offset)
    _end(body, offset)
    return Publish(
        request=request,
        channel=channel,
        content_type=content_type,
        idempotency_key=key or None,
        data=data,
    )


def _read_ping(body: memoryview) -> Ping:
    _end(body, 4)
    return Ping(request=_read_request(body))


def _read_auth(body: memoryview) -> Auth:
    request = _read_request(body)
    token, offset = _read_str(body, 4)
    _end(body, offset)
    return Auth(request=request, token=token)


def _read_welcome(body: memoryview) -> Welcome:
    version, max_frame, size = _WELCOME.unpack_from(body)
    _end(body, _WELCOME.size + size)
    return Welcome(version=version, max_frame=max_frame, server=str(body[7:], "utf-8"))


def _read_ok(body: memoryview) -> Ok:
    _end(body, 4)
    return Ok(request=_read_request(body))


def _read_published(body: memoryview) -> Published:
    _end(body, _PUBLISHED.size)
    request, seq, time_ms = _PUBLISHED.unpack_from(body)
    if request == 0:
        raise _Malformed("request 0 is reserved for ERROR about the connection")
    return Published(request=request, seq=seq, time_ms=time_ms)


def _read_pong(body: memoryview) -> Pong:
    _end(body, 4)
    return Pong(request=_read_request(body))


def _read_message(body: memoryview) -> Message:
    channel, offset = _read_str(body, 0)
    seq, time_ms = _U64X2.unpack_from(body, offset)
    content_type, offset = _read_str(body, offset + 16)
    data, offset = _read_data(body, offset)
    _end(body, offset)
    return Message(channel=channel, seq=seq, time_ms=time_ms, content_type=content_type, data=data)


def _read_error(body: memoryview) -> Error:
    (request,) = _U32.unpack_from(body)
    type_, offset = _read_str(body, 4)
    detail, offset = _read_str(body, offset)
    _end(body, offset)
    return Error(request=request, type=type_, detail=detail)


# A connection reads only what its peer's role sends.
_READERS: dict[Role, dict[int, Callable[[memoryview], Frame]]] = {
    Role.SERVER: {
        FrameType.HELLO: _read_hello,
        FrameType.SUBSCRIBE: _read_subscribe,
        FrameType.UNSUBSCRIBE: _read_unsubscribe,
        FrameType.PUBLISH: _read_publish,
        FrameType.PING: _read_ping,
        FrameType.AUTH: _read_auth,
    },
    Role.CLIENT: {
        FrameType.WELCOME: _read_welcome,
        FrameType.OK: _read_ok,
        FrameType.PUBLISHED: _read_published,
        FrameType.PONG: _read_pong,
        FrameType.MESSAGE: _read_message,
        FrameType.ERROR: _read_error,
    },
}
_NAMES: dict[type[object], str] = {
    Hello: "HELLO",
    Subscribe: "SUBSCRIBE",
    Unsubscribe: "UNSUBSCRIBE",
    Publish: "PUBLISH",
    Ping: "PING",
    Auth: "AUTH",
    Welcome: "WELCOME",
    Ok: "OK",
    Published: "PUBLISHED",
    Pong: "PONG",
    Message: "MESSAGE",
    Error: "ERROR",
}


# -- The state machine --------------------------------------------------------------------------


class ClosingError:
    """Key of :data:`TRANSITIONS` for an ERROR with request 0 (``Error`` is any other)."""


_Move: TypeAlias = type[Frame] | type[ClosingError]


def _move(frame: Frame) -> _Move:
    if type(frame) is Error and frame.request == 0:
        return ClosingError
    return type(frame)


#: ``{(the role that sends, state, frame class): next state}``, for sending and receiving.
TRANSITIONS: Final[dict[tuple[Role, State, _Move], State]] = {
    (Role.CLIENT, State.AWAITING_HELLO, Hello): State.AWAITING_WELCOME,
    (Role.SERVER, State.AWAITING_WELCOME, Welcome): State.OPEN,
    **{
        (Role.CLIENT, State.OPEN, c): State.OPEN
        for c in (Subscribe, Unsubscribe, Publish, Ping, Auth)
    },
    **{(Role.SERVER, State.OPEN, c): State.OPEN for c in (Ok, Published, Pong, Message, Error)},
    # The server's last word, in any state: it may report why it closed (once, see send()).
    **{(Role.SERVER, s, ClosingError): State.CLOSED for s in State},
}


def _rows() -> dict[tuple[Role, State], dict[_Move, State]]:
    rows: dict[tuple[Role, State], dict[_Move, State]] = {}
    for (sender, state, move), next_state in TRANSITIONS.items():
        rows.setdefault((sender, state), {})[move] = next_state
    return rows


# TRANSITIONS by (role that sends, state): a connection keeps its state's two rows at hand,
# so that a frame costs one dict lookup keyed by its class.
_ROWS: Final = _rows()


class Connection:
    """One side of one connection, without I/O. ``role`` is the side we play; ``max_frame`` is
    the largest ``length`` we accept (a server announces it in its WELCOME); ``versions`` are
    the versions we speak (a client offers some of them, a server picks the highest in common).
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        versions: tuple[int, ...] = VERSIONS,
    ) -> None:
        if not 1 <= max_frame <= _MAX_U32:
            raise ValueError(f"max_frame must be between 1 and {_MAX_U32}: {max_frame}")
        if not versions or not all(0 <= v <= 0xFF for v in versions):
            raise ValueError(f"versions must be a non-empty tuple of u8: {versions!r}")
        self._role = role
        self._peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._readers = _READERS[role]
        self._max_frame = max_frame
        self._versions = tuple(versions)
        self._buffer = bytearray()
        self._view: memoryview | None = None  # over _buffer, released before it changes size
        self._pos = 0  # where next_event() resumes in _buffer
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._version: int | None = None
        self._offered: tuple[int, ...] = ()  # the client's HELLO
        self._peer_max_frame: int | None = None  # the server's WELCOME, on the client
        self._said_goodbye = False  # the server sent its ERROR with request 0
        self._enter(State.AWAITING_HELLO)

    def _enter(self, state: State) -> None:
        self._state = state
        self._may_send = _ROWS.get((self._role, state), {})
        self._may_receive = _ROWS.get((self._peer, state), {})
        if state is State.CLOSED:  # nothing more will be parsed
            if self._view is not None:
                self._view.release()
                self._view = None
            self._buffer = bytearray()
            self._pos = 0

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> State:
        return self._state

    @property
    def version(self) -> int | None:
        """The negotiated version: on the server once HELLO is received, on the client once
        WELCOME is."""
        return self._version

    @property
    def max_frame(self) -> int:
        """The largest ``length`` we accept."""
        return self._max_frame

    @property
    def peer_max_frame(self) -> int | None:
        """The largest ``length`` the peer accepts, if it said (the server does in WELCOME)."""
        return self._peer_max_frame

    @property
    def peer_closed(self) -> bool:
        """Has the peer closed its side (``receive_data(b"")``)?"""
        return self._eof

    @property
    def buffered_bytes(self) -> int:
        """Bytes received that :meth:`next_event` has not consumed yet."""
        return len(self._buffer) - self._pos

    # -- Receiving --

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after the end of the stream (b'')")
        if self._state is State.CLOSED:
            return  # nothing more will be parsed
        buffer = self._buffer
        pending = len(buffer) - self._pos
        if pending > self._max_frame + _LENGTH_SIZE:
            raise LocalProtocolError(
                f"{pending} bytes are waiting, more than a frame can take: "
                "call next_event() until NEED_DATA before receive_data()"
            )
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._pos:
            # Cheap on a bytearray: its logical start moves (what is left is a partial frame).
            del buffer[: self._pos]
            self._pos = 0
        buffer += data

    def next_event(self) -> Event:
        """The next frame received, :data:`NEED_DATA` or :data:`CONNECTION_CLOSED`. A frame the
        protocol does not allow raises :class:`RemoteProtocolError` (again on later calls)."""
        if self._state is State.CLOSED:
            if self._error is not None:
                raise self._error
            return CONNECTION_CLOSED
        buffer = self._buffer
        pos = self._pos
        if len(buffer) - pos >= _LENGTH_SIZE:
            (length,) = _U32.unpack_from(buffer, pos)
            if length > self._max_frame:
                raise self._fail(
                    f"a frame of {length} bytes, over the limit of {self._max_frame}",
                    "frame-too-large",
                )
            if length == 0:
                raise self._fail("a frame of length 0")
            end = pos + _LENGTH_SIZE + length
            if end <= len(buffer):
                code = buffer[pos + _LENGTH_SIZE]
                reader = self._readers.get(code)
                if reader is None:
                    raise self._fail(f"unknown frame type 0x{code:02x} from the {self._peer.value}")
                view = self._view
                if view is None:
                    view = self._view = memoryview(buffer)
                try:
                    with view[pos + _LENGTH_SIZE + 1 : end] as body:
                        frame = reader(body)
                except (struct.error, UnicodeDecodeError, _Malformed) as exc:
                    name = FrameType(code).name
                    raise self._fail(f"malformed {name} frame: {exc}") from None
                self._pos = end
                if type(frame) is Error and frame.request == 0:
                    move: _Move = ClosingError
                else:
                    move = type(frame)
                next_state = self._may_receive.get(move)
                if next_state is None:
                    raise self._refuse(frame)
                if move is Auth and (self._version or 0) < AUTH_VERSION:
                    raise self._fail(f"AUTH needs version {AUTH_VERSION}; this is {self._version}")
                if next_state is not self._state:
                    self._received(frame, next_state)
                return frame
        if self._eof:
            if len(buffer) == pos:
                self._enter(State.CLOSED)
                return CONNECTION_CLOSED
            raise self._fail("the connection closed in the middle of a frame")
        return NEED_DATA

    def _refuse(self, frame: Frame) -> RemoteProtocolError:
        if self._role is Role.SERVER and self._state is State.AWAITING_HELLO:
            return self._fail(f"{_NAMES[type(frame)]} before HELLO")
        return self._fail(f"{_describe(frame)} is not allowed in state {self._state.name}")

    def _received(self, frame: Frame, next_state: State) -> None:
        """The handshake's checks, for a frame that changes the state."""
        if type(frame) is Hello:
            common = set(frame.versions).intersection(self._versions)
            if not common:
                raise self._fail(
                    f"no common version: the client speaks {list(frame.versions)}, "
                    f"the server {list(self._versions)}",
                    "unsupported-version",
                )
            self._version = max(common)
        elif type(frame) is Welcome:
            if frame.version not in self._offered:
                raise self._fail(
                    f"WELCOME chose version {frame.version}, not one of {list(self._offered)}",
                    "unsupported-version",
                )
            self._version = frame.version
            self._peer_max_frame = frame.max_frame
        self._enter(next_state)

    def _fail(self, message: str, error_type: str = "protocol-error") -> RemoteProtocolError:
        self._enter(State.CLOSED)
        self._error = RemoteProtocolError(message, error_type=error_type)
        return self._error

    # -- Sending --

    def send(self, frame: Frame) -> bytes:
        """The bytes of ``frame``, to write to the peer; the state advances. A frame this role
        may not send now, or one out of range, raises :class:`LocalProtocolError` and changes
        nothing."""
        move = _move(frame)
        next_state = self._may_send.get(move)
        if next_state is None:
            raise LocalProtocolError(
                f"a {self._role.value} cannot send {_describe(frame)} in state {self._state.name}"
            )
        if move is ClosingError and self._said_goodbye:
            raise LocalProtocolError("the server already sent its ERROR with request 0")
        if move is Auth and (self._version or 0) < AUTH_VERSION:
            raise LocalProtocolError(
                f"AUTH needs version {AUTH_VERSION}; the connection speaks {self._version}"
            )
        if type(frame) is Hello:
            if not frame.versions or not set(frame.versions).issubset(self._versions):
                raise LocalProtocolError(
                    f"HELLO must offer some of the versions {list(self._versions)}: "
                    f"{list(frame.versions)}"
                )
        elif type(frame) is Welcome:
            if frame.version != self._version:
                raise LocalProtocolError(
                    f"WELCOME must carry the version chosen, {self._version}: {frame.version}"
                )
            if frame.max_frame > self._max_frame:
                raise LocalProtocolError(
                    f"WELCOME announces max_frame {frame.max_frame}, "
                    f"over this connection's {self._max_frame}"
                )
        data = encode(frame)
        if self._peer_max_frame is not None and len(data) - _LENGTH_SIZE > self._peer_max_frame:
            raise LocalProtocolError(
                f"a {_NAMES[type(frame)]} frame of {len(data) - _LENGTH_SIZE} bytes, over the "
                f"peer's limit of {self._peer_max_frame}",
                error_type="frame-too-large",
            )
        if type(frame) is Hello:
            self._offered = frame.versions
        elif move is ClosingError:
            self._said_goodbye = True
        self._enter(next_state)
        return data


def _describe(frame: Frame) -> str:
    if type(frame) is Error and frame.request == 0:
        return "ERROR with request 0"
    return _NAMES[type(frame)]
