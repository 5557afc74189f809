"""WebSocket endpoints: ``/v1/channels/{channel}/ws`` (one channel), ``/v1/ws`` (multiplexed),
and ``/v1/echo`` (every message sent back, for conformance testing; only with ``ws_echo``).

Both run over the ASGI server's WebSocket support. :class:`SocketSink` is the fan-out engine's
view of a connection: queued frames are sent by one writer coroutine, in order, so answers to
commands and pushed messages never overtake each other. The protocol is documented in
``docs/protocol.md``; close codes are in :data:`CLOSE_CODES`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import orjson

from ..core.channels import validate_channel
from ..core.errors import BackchannelError, InvalidRequest, Unavailable
from ..core.fanout import CloseReason
from ..core.grants import Action
from ..core.messages import Message
from ..wire import InvalidCursor, parse_id
from ..wire.jsonfmt import format_time
from ..wire.ws import close_frame, text_frame
from .asgi import Send
from .auth import require
from .fastpath import direct_ws_transport
from .http import Request
from .problems import CONTENT_TYPE as PROBLEM_CONTENT_TYPE
from .problems import PROBLEM_TYPES, HTTPProblem, problem_for
from .session import Session

log = logging.getLogger("backchannel.websocket")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_BAD_REQUEST = 4000
CLOSE_SLOW_CONSUMER = 4008
CLOSE_TOKEN_EXPIRED = 4401
CLOSE_FORBIDDEN = 4403

CLOSE_CODES = {
    CloseReason.SHUTTING_DOWN: (CLOSE_GOING_AWAY, "the hub is shutting down"),
    CloseReason.SLOW_CONSUMER: (CLOSE_SLOW_CONSUMER, "slow consumer"),
    CloseReason.FAILED: (CLOSE_INTERNAL_ERROR, "internal error"),
    CloseReason.UNSUBSCRIBED: (CLOSE_NORMAL, ""),
    CloseReason.TOKEN_EXPIRED: (CLOSE_TOKEN_EXPIRED, "token-expired: the token expired"),
}
#: Publishes one connection may have in flight before the hub stops reading its frames.
MAX_IN_FLIGHT = 64
TAIL_TIMEOUT = 1.0
DRAIN_POLL = 0.005


def json_payload(message: Message) -> bytes:
    return message.json


def json_ws_frame(message: Message) -> bytes:
    return message.ws_frame


def mux_payload(message: Message) -> bytes:
    return message.mux_json


def mux_ws_frame(message: Message) -> bytes:
    return message.mux_ws_frame


class SocketSink:
    """A :class:`~backchannel.core.fanout.Sink` writing text frames to an ASGI WebSocket.

    By default a writer coroutine sends each queued payload through ASGI ``send``. When
    :func:`.fastpath.direct_ws_transport` finds the connection's transport, the sink is
    *direct*: what is queued are whole frames (a message's is encoded once, see
    :attr:`~backchannel.core.messages.Message.ws_frame`), and :meth:`flush` writes them itself.
    """

    def __init__(
        self, send: Send, transport: asyncio.Transport | None = None, *, grace: float = 5.0
    ) -> None:
        self._send = send
        self._transport = transport
        #: Seconds a slow consumer has to read what was sent, and its close frame.
        self.grace = grace
        self._frames: list[bytes] = []
        self._size = 0
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.close_reason: CloseReason | None = None

    @property
    def direct(self) -> bool:
        return self._transport is not None

    def write(self, data: bytes) -> None:
        """Queue a payload, or in a direct sink a whole frame."""
        if self.close_reason is not None:
            return  # closing: nothing more goes out
        self._frames.append(data)
        self._size += len(data)

    def write_text(self, payload: bytes) -> None:
        """Queue a payload, framing it if the sink is direct."""
        self.write(text_frame(payload) if self._transport is not None else payload)

    def flush(self) -> None:
        if not self._frames or self.close_reason is not None:
            return
        transport = self._transport
        if transport is None:
            self._wake.set()
            return
        frames, self._frames = self._frames, []
        self._size = 0
        if not transport.is_closing():
            transport.writelines(frames)

    def buffered(self) -> int:
        if self._transport is not None:
            return self._size + self._transport.get_write_buffer_size()
        return self._size + self._in_flight

    async def drained(self) -> None:
        if self._transport is not None:
            # The ASGI server's flow control is not ours to wait on: look now and then.
            while self._transport.get_write_buffer_size() and self.close_reason is None:  # noqa: ASYNC110
                await asyncio.sleep(DRAIN_POLL)
            return
        while self.buffered() and self.close_reason is None:
            self._drained.clear()
            await self._drained.wait()

    def close(self, reason: CloseReason) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            self._wake.set()
            self._drained.set()
            if reason is CloseReason.SLOW_CONSUMER and self._transport is not None:
                self._cut(self._transport)
            elif self._in_flight and self._task is not None:
                self._task.cancel()  # stuck behind a client that does not read

    def _cut(self, transport: asyncio.Transport) -> None:
        """Cut a slow consumer of a direct sink: the close frame goes behind what the transport
        already holds, and the connection closes once that is out, or is dropped when the
        client has not read it all within the grace period."""
        self._frames.clear()
        self._size = 0
        if self.grace <= 0 or transport.is_closing():
            transport.abort()
            return
        code, text = CLOSE_CODES[CloseReason.SLOW_CONSUMER]
        transport.write(close_frame(code, text))
        transport.close()
        asyncio.get_running_loop().call_later(self.grace, transport.abort)

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    async def run(self) -> None:
        """Send queued frames until the sink is closed, then the close frame."""
        self._task = asyncio.current_task()
        try:
            await self._send_until_closed()
        except asyncio.CancelledError:
            if self.close_reason is None:
                raise
        reason = self.close_reason
        if reason is None or reason is CloseReason.UNSUBSCRIBED:
            return  # the client closed: the server already answered its close frame
        if reason is CloseReason.SLOW_CONSUMER and self._transport is not None:
            await asyncio.sleep(0)  # closed or aborted by _cut: let the server see it
            return
        code, text = CLOSE_CODES[reason]
        # A slow consumer's close frame waits behind what it has not read: give it the grace.
        tail = self.grace if reason is CloseReason.SLOW_CONSUMER else TAIL_TIMEOUT
        with contextlib.suppress(TimeoutError, OSError, RuntimeError):
            async with asyncio.timeout(tail):
                await self._send({"type": "websocket.close", "code": code, "reason": text})

    async def _send_until_closed(self) -> None:
        send = self._send
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.close_reason is not None:
                return
            frames, self._frames = self._frames, []
            self._in_flight, self._size = self._size, 0
            for frame in frames:
                await send({"type": "websocket.send", "text": frame.decode()})
                self._in_flight -= len(frame)
            if not self._frames:
                self._drained.set()


async def _receive_until_closed(request: Request, sink: SocketSink) -> None:
    """Read and drop what the client sends (the one-channel socket takes no commands)."""
    while True:
        message = await request.receive()
        if message["type"] == "websocket.disconnect":
            sink.close(CloseReason.UNSUBSCRIBED)
            return


async def _handshake(request: Request) -> bool:
    """Take the connect event, check the origin and the token. False: refused (and
    answered)."""
    if (await request.receive())["type"] != "websocket.connect":
        return False
    origin = request.header(b"origin")
    if origin is not None and not request.app.origin_allowed(origin, request.header(b"host")):
        log.info("refused a WebSocket from origin %r", origin[:100])
        await request.send({"type": "websocket.close", "code": CLOSE_POLICY})
        return False
    try:
        request.authenticate(token_in_query=True)
    except HTTPProblem as problem:
        await _refuse(request, problem)
        return False
    return True


async def _refuse(request: Request, problem: HTTPProblem) -> None:
    """Refuse the upgrade with the problem as an HTTP response (401 with WWW-Authenticate),
    where the server lets the app answer a handshake (ASGI's ``websocket.http.response``
    extension: uvicorn has it); elsewhere with a bare 403."""
    if "websocket.http.response" not in (request.scope.get("extensions") or {}):
        await request.send({"type": "websocket.close", "code": CLOSE_POLICY})
        return
    body = problem.body(request.path)
    headers = [
        *problem.headers,
        (b"content-type", PROBLEM_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
    ]
    await request.send(
        {"type": "websocket.http.response.start", "status": problem.type.status, "headers": headers}
    )
    await request.send({"type": "websocket.http.response.body", "body": body})


def _expire(request: Request, sink: SocketSink) -> asyncio.TimerHandle | None:
    """Close the socket with 4401 when the caller's token expires."""
    left = request.seconds_left()
    if left is None:
        return None
    return asyncio.get_running_loop().call_later(left, sink.close, CloseReason.TOKEN_EXPIRED)


async def _serve(sink: SocketSink, reader: Coroutine[Any, Any, None]) -> None:
    """Run the writer and ``reader`` until either ends (the client left, or the hub closed
    the sink: slow consumer, shutdown), then stop the other."""
    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(sink.run()), loop.create_task(reader)}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if sink.close_reason is None:
            sink.close(CloseReason.UNSUBSCRIBED)
        reading = [t for t in tasks if t.get_coro() is reader]
        for task in reading:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def channel_socket(request: Request) -> None:
    if not await _handshake(request):
        return
    hub = request.app.hub
    send = request.send
    try:
        channel = validate_channel(request.params["channel"])
        after_text = request.query().get("after")
        after = parse_id(after_text) if after_text is not None else None
        require(request.identity, Action.SUBSCRIBE, channel)
    except (InvalidRequest, InvalidCursor, HTTPProblem) as exc:
        await send({"type": "websocket.accept"})
        # The reason names the problem type first, as clients may branch on it.
        if isinstance(exc, HTTPProblem):
            slug, detail = exc.type.slug, exc.detail
        elif isinstance(exc, InvalidRequest):
            slug, detail = exc.kind, exc.detail
        else:
            slug, detail = "invalid-cursor", str(exc)
        # A close reason has at most 123 bytes of UTF-8: cut by bytes, not characters.
        reason = f"{slug}: {detail}".encode()[:120].decode(errors="ignore")
        code = CLOSE_FORBIDDEN if slug == "forbidden" else CLOSE_BAD_REQUEST
        await send({"type": "websocket.close", "code": code, "reason": reason})
        return
    await send({"type": "websocket.accept"})
    sink = _sink(request)
    encode = json_ws_frame if sink.direct else json_payload
    try:
        subscription = hub.subscribe(channel, sink, encode, transport="ws", after=after)
    except Unavailable:
        await send({"type": "websocket.close", "code": CLOSE_GOING_AWAY})
        return
    expiry = _expire(request, sink)
    try:
        await _serve(sink, _receive_until_closed(request, sink))
    finally:
        if expiry is not None:
            expiry.cancel()
        hub.unsubscribe(subscription)


def _sink(request: Request) -> SocketSink:
    """A sink for an accepted WebSocket: direct when the server allows it."""
    settings = request.app.settings
    direct = direct_ws_transport(request.send) if settings.direct_writes else None
    return SocketSink(request.send, direct, grace=settings.slow_consumer_grace)


class MuxSession:
    """One ``/v1/ws`` connection: JSON commands in, JSON answers and messages out."""

    def __init__(self, request: Request, sink: SocketSink) -> None:
        self.request = request
        self.sink = sink
        self.session = Session(
            request.app.hub,
            sink,
            mux_ws_frame if sink.direct else mux_payload,
            transport="ws",
            max_subscriptions=request.app.settings.max_subscriptions,
            identity=request.identity,
        )
        self.publishing: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    def reply(self, document: dict[str, Any]) -> None:
        self.sink.write_text(orjson.dumps(document))
        self.sink.flush()

    def error(self, request_id: Any, slug: str, detail: str) -> None:
        problem = PROBLEM_TYPES[slug]
        self.reply(
            {
                "op": "error",
                "id": request_id,
                "type": problem.uri,
                "title": problem.title,
                "detail": detail,
            }
        )

    async def read_commands(self) -> None:
        receive = self.request.receive
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.sink.close(CloseReason.UNSUBSCRIBED)
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            try:
                command = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                self.error(None, "malformed-json", f"a command is a JSON object: {exc}")
                continue
            if not isinstance(command, dict):
                self.error(None, "invalid-command", "a command is a JSON object with an op")
                continue
            await self.handle(command)

    async def handle(self, command: dict[str, Any]) -> None:
        request_id = command.get("id")
        if not isinstance(request_id, int | str) or isinstance(request_id, bool):
            self.error(None, "invalid-command", "every command needs an id (number or string)")
            return
        op = command.get("op")
        try:
            if op == "subscribe":
                after = _after(command.get("after"))
                self.session.subscribe(
                    _channel(command), after, lambda: self.reply({"op": "ok", "id": request_id})
                )
            elif op == "unsubscribe":
                self.session.unsubscribe(_channel(command))
                self.reply({"op": "ok", "id": request_id})
            elif op == "publish":
                await self.slots.acquire()
                task = asyncio.get_running_loop().create_task(self.publish(request_id, command))
                self.publishing.add(task)
                task.add_done_callback(self._published)
            elif op == "ping":
                self.reply({"op": "pong", "id": request_id})
            else:
                self.error(request_id, "invalid-command", f"unknown op {str(op)[:40]!r}")
        except HTTPProblem as problem:
            self.error(request_id, problem.type.slug, problem.detail)
        except BackchannelError as exc:
            self.error(request_id, problem_for(exc).type.slug, exc.detail)

    def _published(self, task: asyncio.Task[None]) -> None:
        self.publishing.discard(task)
        self.slots.release()

    async def publish(self, request_id: Any, command: dict[str, Any]) -> None:
        try:
            data, content_type = _publish_body(command)
            key = command.get("idempotency_key")
            if key is not None and not isinstance(key, str):
                raise HTTPProblem("invalid-idempotency-key", "idempotency_key must be a string")
            appended = await self.session.publish(_channel(command), data, content_type, key)
        except HTTPProblem as problem:
            self.error(request_id, problem.type.slug, problem.detail)
        except BackchannelError as exc:
            self.error(request_id, problem_for(exc).type.slug, exc.detail)
        else:
            message = appended.message
            self.reply(
                {
                    "op": "published",
                    "id": request_id,
                    "message_id": message.id,
                    "time": format_time(message.time_ms),
                }
            )

    def close(self) -> None:
        self.session.close()
        for task in self.publishing:
            task.cancel()


def _channel(command: dict[str, Any]) -> str:
    channel = command.get("channel")
    if not isinstance(channel, str):
        raise HTTPProblem("invalid-command", "channel must be a string")
    return channel


def _after(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise HTTPProblem("invalid-cursor", "after must be a message id string")
    try:
        return parse_id(value)
    except InvalidCursor as exc:
        raise HTTPProblem("invalid-cursor", str(exc)) from None


_DEFAULT_TYPES = {
    "json": "application/json",
    "text": "text/plain; charset=utf-8",
    "base64": "application/octet-stream",
}


def _publish_body(command: dict[str, Any]) -> tuple[bytes, str]:
    encoding = command.get("encoding", "json")
    if encoding not in _DEFAULT_TYPES:
        raise HTTPProblem("invalid-command", "encoding is json, text or base64")
    if "data" not in command:
        raise HTTPProblem("invalid-command", "publish needs data")
    content_type = command.get("content_type", _DEFAULT_TYPES[encoding])
    if not isinstance(content_type, str):
        raise HTTPProblem("unsupported-media-type", "content_type must be a string")
    value = command["data"]
    if encoding == "json":
        return orjson.dumps(value), content_type
    if not isinstance(value, str):
        raise HTTPProblem("invalid-command", f"with encoding {encoding}, data is a string")
    if encoding == "text":
        try:
            return value.encode("utf-8"), content_type
        except UnicodeEncodeError:
            raise HTTPProblem("invalid-text", "data is not valid Unicode text") from None
    try:
        return base64.b64decode(value, validate=True), content_type
    except binascii.Error:
        raise HTTPProblem("invalid-command", "data is not valid base64") from None


async def mux_socket(request: Request) -> None:
    if not await _handshake(request):
        return
    hub = request.app.hub
    await request.send({"type": "websocket.accept"})
    sink = _sink(request)
    try:
        hub.attach(sink)  # so that shutdown closes it even while it has no subscription
    except Unavailable:
        await request.send({"type": "websocket.close", "code": CLOSE_GOING_AWAY})
        return
    session = MuxSession(request, sink)
    expiry = _expire(request, sink)
    try:
        await _serve(sink, session.read_commands())
    finally:
        if expiry is not None:
            expiry.cancel()
        session.close()
        hub.detach(sink)


async def echo_socket(request: Request) -> None:
    """``/v1/echo``: send every message back unchanged, text as text and binary as binary.

    Text replies go out as pushed messages do (whole frames from :func:`.wire.ws.text_frame`
    written to the transport, when :func:`.fastpath.direct_ws_transport` finds it), so that a
    conformance suite exercises the hub's own frame encoder; binary replies, and text ones
    where there is no direct transport, through ASGI ``send``. The connection is attached to
    the hub like a ``/v1/ws`` one, so shutdown closes it with 1001 and an expired token with
    4401.
    """
    if not await _handshake(request):
        return
    await request.send({"type": "websocket.accept"})
    sink = _sink(request)
    hub = request.app.hub
    try:
        hub.attach(sink)
    except Unavailable:
        await request.send({"type": "websocket.close", "code": CLOSE_GOING_AWAY})
        return
    expiry = _expire(request, sink)
    try:
        await _serve(sink, _echo_until_closed(request, sink))
    finally:
        if expiry is not None:
            expiry.cancel()
        hub.detach(sink)


async def _echo_until_closed(request: Request, sink: SocketSink) -> None:
    """Send each message back, one at a time: the next is read only once the reply is on its
    way and the transport has drained, so a client that sends without reading holds at most
    a message or two in the hub (the ASGI server stops reading while one waits)."""
    receive, send = request.receive, request.send
    limit = request.app.settings.ws_max_size
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            sink.close(CloseReason.UNSUBSCRIBED)
            return
        text: str | None = message.get("text")
        data: bytes = text.encode() if text is not None else message.get("bytes") or b""
        try:
            if len(data) > limit:
                # The ASGI server enforces the same limit first under ``backchannel serve``;
                # this is for a hub mounted in an app whose server allows more.
                if not sink.closed:
                    reason = f"Message exceeds the maximum size ({limit} bytes)"
                    await send(
                        {"type": "websocket.close", "code": CLOSE_MESSAGE_TOO_BIG, "reason": reason}
                    )
                return
            if text is not None and sink.direct:
                sink.write_text(data)
                sink.flush()
                await sink.drained()
            elif text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": data})
        except OSError:
            return  # the client went away (uvicorn's ClientDisconnected)
        except RuntimeError:
            if sink.closed:
                return  # the hub's close (shutdown, token expiry) went out first
            raise
