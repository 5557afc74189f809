"""Server-sent events: ``GET /v1/channels/{channel}/events`` and ``GET /v1/events``.

A stream is an ASGI response whose body never ends on its own. :class:`StreamSink` is the fan-out
engine's view of it: the engine queues event bytes, and one writer coroutine per stream sends
whatever has gathered in one ``http.response.body`` message, so a burst of messages costs one
write. Flow control comes from the ASGI server: while the client does not read, ``send`` does not
return, bytes pile up in the sink, and past ``max_outbound_bytes`` the engine cuts the stream.

Heartbeats are sent by one timer for all streams (not one per stream): every ``sse_heartbeat``
seconds, each stream that sent nothing for that long gets a comment line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import orjson

from ..core.channels import validate_channel
from ..core.fanout import CloseReason, Subscription
from ..core.grants import Action
from ..core.messages import Message
from ..wire import InvalidCursor, parse_id
from ..wire.sse import CONTENT_TYPE, encode_comment, encode_event, encode_retry
from .asgi import Receive, Send
from .auth import require
from .fastpath import DetachedStream, direct_transport, take_over
from .http import Request
from .problems import PROBLEM_TYPES, HTTPProblem

log = logging.getLogger("backchannel.sse")

HEARTBEAT = encode_comment("heartbeat")


def _expired_event() -> bytes:
    problem = PROBLEM_TYPES["token-expired"]
    document = {
        "type": problem.uri,
        "title": problem.title,
        "status": problem.status,
        "detail": "the token expired: reconnect with a new token; Last-Event-ID or after= "
        "resumes after the last message",
    }
    return encode_event(orjson.dumps(document).decode(), event="token-expired")


#: The last event of a stream whose token expired (docs/sse.md, "Authentication").
TOKEN_EXPIRED_EVENT = _expired_event()
#: Channels one stream may carry: within the 50 query parameters a request may have, with
#: room for ``after``.
MAX_STREAM_CHANNELS = 48
#: How long the last bytes of a stream that is being closed may take to go out.
TAIL_TIMEOUT = 1.0


def sse_frame(message: Message) -> bytes:
    return message.sse


def comeback_ms(retry_ms: int) -> int:
    """The ``retry:`` of a stream the hub ends because it is stopping: somewhere between
    ``retry_ms`` and twice that, so that the browsers of thousands of streams do not all come
    back to the restarted hub in the same moment (and overflow its listen queue)."""
    return retry_ms + int(retry_ms * random.random())


class StreamSink:
    """A :class:`~backchannel.core.fanout.Sink` writing to an ASGI response body.

    Until :meth:`start` it only queues. Then it either writes HTTP chunks straight to the
    connection's transport from :meth:`flush` (when :func:`.fastpath.direct_transport` found
    it), or hands what is queued to a writer coroutine that sends it through ASGI ``send``.
    A direct stream keeps no coroutine of its own: the request's task only waits for the
    client to leave. A stream :meth:`detach`-ed from the server keeps not even that: its
    connection belongs to a :class:`~.fastpath.DetachedStream`, and the sink ends the
    response and closes the connection itself.
    """

    __slots__ = (
        "_chunks",
        "_detached",
        "_drained",
        "_in_flight",
        "_on_closed",
        "_send",
        "_size",
        "_started",
        "_task",
        "_transport",
        "_wake",
        "close_reason",
        "grace",
        "retry_ms",
        "wrote",
    )

    def __init__(self, send: Send, retry_ms: int, grace: float = 5.0) -> None:
        self._send = send
        #: Seconds a slow consumer has to read what was sent, and the end of the stream.
        self.grace = grace
        self._chunks: list[bytes] = []
        self._size = 0
        self._in_flight = 0
        self._started = False
        self._transport: asyncio.Transport | None = None
        # Only the ASGI path has a writer to wake and to wait for.
        self._wake: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._detached: DetachedStream | None = None
        self._on_closed: Callable[[], None] | None = None
        self.close_reason: CloseReason | None = None
        #: Set by every write that went out; the heartbeat timer resets it each round, so no
        #: clock is read per message on the hot path.
        self.wrote = False
        self.retry_ms = retry_ms

    def start(self, transport: asyncio.Transport | None) -> None:
        """The response has started: flushes may send from now on, directly to ``transport``
        if there is one."""
        self._started = True
        self._transport = transport
        if transport is None:
            self._wake = asyncio.Event()
            self._drained = asyncio.Event()

    def detach(self, on_closed: Callable[[], None]) -> bool:
        """Take the started, direct stream's connection from the server (see
        :func:`.fastpath.take_over`); ``on_closed`` runs once the stream has ended, soon after
        :meth:`close`. False if the server keeps it: then :meth:`run` serves the stream."""
        if self._transport is None:
            return False
        detached = take_over(self._send, self._lost)
        if detached is None:
            return False
        self._detached = detached
        self._on_closed = on_closed
        return True

    def _lost(self) -> None:
        self.close(CloseReason.UNSUBSCRIBED)

    def write(self, data: bytes) -> None:
        if self.close_reason is not None:
            return  # closing: the tail is decided in run()
        self._chunks.append(data)
        self._size += len(data)

    def flush(self) -> None:
        if not self._chunks or not self._started or self.close_reason is not None:
            return
        transport = self._transport
        if transport is None:
            assert self._wake is not None
            self._wake.set()
            return
        chunks = self._chunks
        self._chunks = []
        size, self._size = self._size, 0
        if transport.is_closing():
            return
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        # One buffer, one write(2): cheaper for the kernel than a writev of three.
        transport.write(b"%x\r\n%s\r\n" % (size, body))
        self.wrote = True

    def buffered(self) -> int:
        if self._transport is not None:
            return self._size + self._transport.get_write_buffer_size()
        return self._size + self._in_flight

    async def drained(self) -> None:
        if self._detached is not None:
            await self._detached.drained()
            return
        if self._drained is None:
            # Direct, or not started: an empty body through the server's own send() waits
            # out its flow control.
            if self._started:
                await self._send({"type": "http.response.body", "body": b"", "more_body": True})
            return
        while self.buffered() and self.close_reason is None:
            self._drained.clear()
            await self._drained.wait()

    def close(self, reason: CloseReason) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if self._wake is not None and self._drained is not None:
            self._wake.set()
            self._drained.set()
        if reason is CloseReason.SLOW_CONSUMER and self._transport is not None:
            self._cut(self._transport)
        if self._detached is not None:
            self._end_detached(reason)
            return
        task = self._task
        # Waiting for the client (direct), or stuck in send() behind a client that does not
        # read: stop waiting.
        waiting = self._transport is not None or self._in_flight
        if task is not None and task is not asyncio.current_task() and waiting:
            task.cancel()

    def _end_detached(self, reason: CloseReason) -> None:
        """What :meth:`run` does after a close, for a stream no task serves: the last bytes,
        the end of the body, then the connection closes (a stream is not kept alive)."""
        transport = self._transport
        assert transport is not None
        if reason is CloseReason.SLOW_CONSUMER:
            log.warning("cut a slow SSE consumer")  # _cut ended the body
        elif reason is not CloseReason.UNSUBSCRIBED and not transport.is_closing():
            tail = b"".join(self._chunks)
            if reason is CloseReason.SHUTTING_DOWN:
                tail += encode_retry(comeback_ms(self.retry_ms))
            elif reason is CloseReason.TOKEN_EXPIRED:
                tail += TOKEN_EXPIRED_EVENT
            if tail:
                transport.write(b"%x\r\n%s\r\n" % (len(tail), tail))
            transport.write(b"0\r\n\r\n")
            transport.close()  # after what is buffered has gone out
        self._chunks = []
        self._size = 0
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            # Not now: the engine may be walking the subscriptions this would remove.
            asyncio.get_running_loop().call_soon(on_closed)

    def _cut(self, transport: asyncio.Transport) -> None:
        """Cut a slow consumer of a direct stream: the end of the chunked body goes behind what
        the transport already holds, so the client sees the response end once it has read
        that; a client that has not read it all within the grace period is dropped."""
        self._chunks.clear()
        self._size = 0
        if self.grace <= 0 or transport.is_closing():
            transport.abort()
            return
        transport.write(b"0\r\n\r\n")
        transport.close()
        asyncio.get_running_loop().call_later(self.grace, transport.abort)

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    async def run(self, receive: Receive) -> None:
        """Serve the stream until the sink is closed or the client leaves; then, unless the
        client is gone or too slow, send the stream's last bytes."""
        task = self._task = asyncio.current_task()
        assert task is not None
        try:
            if self._transport is not None:
                await self._until_disconnected(receive)
            else:
                watcher = asyncio.get_running_loop().create_task(self._until_disconnected(receive))
                try:
                    await self._send_until_closed()
                finally:
                    watcher.cancel()
        except asyncio.CancelledError:
            if self.close_reason is None:
                raise  # cancelled from outside, not by close()
            task.uncancel()
        self._task = None
        if self.close_reason is CloseReason.SLOW_CONSUMER and self._transport is not None:
            return  # _cut ended the body: see gone()
        if self.close_reason is CloseReason.UNSUBSCRIBED:
            return
        if self.close_reason is CloseReason.SLOW_CONSUMER:
            # Only the end of the body, behind what the client has not read: it resumes from
            # its last whole event. The grace bounds how long the hub waits for it.
            tail, timeout = b"", self.grace
        else:
            tail, timeout = b"".join(self._chunks), TAIL_TIMEOUT
        if self.close_reason is CloseReason.SHUTTING_DOWN:
            tail += encode_retry(comeback_ms(self.retry_ms))  # when the browser comes back
        elif self.close_reason is CloseReason.TOKEN_EXPIRED:
            tail += TOKEN_EXPIRED_EVENT
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if tail:
                    await self._send(
                        {"type": "http.response.body", "body": tail, "more_body": True}
                    )
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def gone(self, receive: Receive) -> None:
        """After a direct stream was cut as a slow consumer, wait (at most the grace period)
        until the server sees the connection gone, so that it does not take the response for
        one the app left unfinished."""
        if self.close_reason is not CloseReason.SLOW_CONSUMER or self._transport is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace + TAIL_TIMEOUT):
                while (await receive())["type"] != "http.disconnect":
                    pass

    async def _until_disconnected(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # The client left: nothing more can be sent, and the body need not be ended.
        self.close(CloseReason.UNSUBSCRIBED)

    async def _send_until_closed(self) -> None:
        send = self._send
        assert self._wake is not None and self._drained is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.close_reason is not None:
                break
            if not self._chunks:
                continue
            data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            self._chunks = []
            self._size = 0
            self._in_flight = len(data)
            self.wrote = True
            try:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            except asyncio.CancelledError:
                # close() stopped a send stuck behind a client that does not read. uvicorn
                # waits for its flow control before writing, so nothing of it went out: put it
                # back, or a tail sent after it (at shutdown) would leave a gap.
                self._chunks.insert(0, data)
                raise
            self._in_flight = 0
            if not self._chunks:
                self._drained.set()


class Heartbeats:
    """One timer that keeps every idle stream alive."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.sinks: set[StreamSink] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for sink in self.sinks:
                if not sink.wrote and not sink.buffered():
                    sink.write(HEARTBEAT)
                    sink.flush()
                sink.wrote = False  # a heartbeat does not count as traffic


def _cursor(value: str, what: str) -> int:
    try:
        return parse_id(value)
    except InvalidCursor as exc:
        raise HTTPProblem("invalid-cursor", f"{what}: {exc}") from None


def stream_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The stream's headers; a browser page from an origin not allowed gets a 403 instead of
    a stream it could not read anyway."""
    headers = [
        (b"content-type", CONTENT_TYPE + b"; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]
    origin = request.header(b"origin")
    if origin is not None:
        if not request.app.origin_allowed(origin, request.header(b"host")):
            raise HTTPProblem(
                "origin-not-allowed",
                f"pages from {origin[:100]!r} may not open streams here (see allowed_origins)",
            )
        headers.append((b"access-control-allow-origin", origin.encode("latin-1")))
        headers.append((b"vary", b"origin"))
    return headers


async def _stream(request: Request, subscribe: Callable[[StreamSink], list[Subscription]]) -> None:
    """Run one event stream: subscribe, send, and clean up however it ends."""
    app = request.app
    settings = app.settings
    headers = stream_headers(request)
    sink = StreamSink(request.send, int(settings.sse_retry * 1000), settings.slow_consumer_grace)
    subscriptions = subscribe(sink)  # may raise: still early enough for a problem response
    request.streaming = True
    expiry: asyncio.TimerHandle | None = None
    app.heartbeats.sinks.add(sink)

    def cleanup() -> None:
        if expiry is not None:
            expiry.cancel()
        app.heartbeats.sinks.discard(sink)
        for subscription in subscriptions:
            app.hub.unsubscribe(subscription)

    detached = False
    try:
        await request.send({"type": "http.response.start", "status": 200, "headers": headers})
        await request.send(
            {"type": "http.response.body", "body": encode_retry(sink.retry_ms), "more_body": True}
        )
        sink.start(direct_transport(request.send) if settings.direct_writes else None)
        left = request.seconds_left()
        if left is not None:
            expiry = asyncio.get_running_loop().call_later(
                left, sink.close, CloseReason.TOKEN_EXPIRED
            )
        if sink.close_reason is None:
            detached = sink.detach(cleanup)
        sink.flush()  # what a replay queued meanwhile
        if not detached:
            await sink.run(request.receive)
    finally:
        if not detached:
            cleanup()
    if not detached and sink.close_reason is CloseReason.SLOW_CONSUMER:
        log.warning("cut a slow SSE consumer of %s", request.path)
        await sink.gone(request.receive)


async def channel_events(request: Request) -> None:
    hub = request.app.hub
    channel = validate_channel(request.params["channel"])
    require(request.identity, Action.SUBSCRIBE, channel)
    query = request.query()
    last_event_id = request.header(b"last-event-id")
    after: int | None = None
    # A browser that reconnects sends Last-Event-ID and the URL it first used: the header is
    # the newer position.
    if last_event_id:
        after = _cursor(last_event_id.strip(), "Last-Event-ID")
    elif "after" in query:
        after = _cursor(query["after"], "after")

    def subscribe(sink: StreamSink) -> list[Subscription]:
        return [hub.subscribe(channel, sink, sse_frame, transport="sse", after=after)]

    await _stream(request, subscribe)


def parse_positions(text: str) -> dict[str, int]:
    """A multi-channel stream's composite id: ``channel=SEQ,channel=SEQ`` with SEQ in hex."""
    positions: dict[str, int] = {}
    for part in text.split(","):
        name, sep, seq = part.rpartition("=")
        if not sep:
            raise HTTPProblem("invalid-cursor", f"{part[:60]!r} is not channel=ID")
        positions[validate_channel(name)] = _cursor(seq, f"the position of {name}")
    return positions


def format_positions(positions: dict[str, int]) -> bytes:
    return ",".join(f"{name}={seq:x}" for name, seq in positions.items()).encode()


async def multi_events(request: Request) -> None:
    hub = request.app.hub
    channels = list(dict.fromkeys(request.query_all("channel")))
    query = request.query(repeatable=frozenset({"channel"}))  # refuses other repetitions
    if not channels:
        raise HTTPProblem("invalid-parameter", "name at least one channel: ?channel=a&channel=b")
    if len(channels) > MAX_STREAM_CHANNELS:
        raise HTTPProblem(
            "invalid-parameter", f"a stream carries at most {MAX_STREAM_CHANNELS} channels"
        )
    for channel in channels:
        validate_channel(channel)
        require(request.identity, Action.SUBSCRIBE, channel)
    resume = request.header(b"last-event-id") or query.get("after")
    given = parse_positions(resume) if resume else {}
    # Every channel needs a position, so that the composite id can resume each of them: where
    # none was given, the stream starts after the channel's current last message.
    positions: dict[str, int] = {}
    for channel in channels:
        if channel in given:
            positions[channel] = given[channel]
        else:
            positions[channel] = int((await hub.info(channel)).last_id, 16)

    def frame(message: Message) -> bytes:
        positions[message.channel] = message.seq
        return b"id: " + format_positions(positions) + b"\n" + message.sse_data

    def subscribe(sink: StreamSink) -> list[Subscription]:
        made: list[Subscription] = []
        try:
            for channel in channels:
                made.append(
                    hub.subscribe(channel, sink, frame, transport="sse", after=positions[channel])
                )
        except BaseException:
            for subscription in made:
                hub.unsubscribe(subscription)
            raise
        return made

    await _stream(request, subscribe)
