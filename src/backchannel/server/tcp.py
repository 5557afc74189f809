"""The raw TCP transport: the binary protocol of :mod:`backchannel.wire.frames` over asyncio.

This is a thin adapter: :class:`TcpConnection` feeds received bytes to the sans-I/O
:class:`~backchannel.wire.frames.Connection`, applies each command through a
:class:`~.session.Session`, and is itself the fan-out engine's
:class:`~backchannel.core.fanout.Sink`, writing straight to the transport. Flow control is the
transport's: ``buffered()`` is what the kernel has not taken yet, and while too many publishes
are in flight the connection stops reading.

With auth on, a connection acts for nobody until its AUTH frame (protocol version 2) carries a
token that verifies: commands before that are refused with ``token-required``, a token that
does not verify closes the connection, and when the token expires the connection gets
``ERROR`` ``token-expired`` and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import cast

from .. import __version__
from ..core.errors import BackchannelError, Unavailable
from ..core.fanout import CloseReason
from ..core.hub import Hub
from ..core.messages import Message
from ..wire import frames
from ..wire.cursor import MAX_SEQ
from .auth import ANONYMOUS, Authenticator
from .limits import ConnectionLimit, Refusal
from .problems import HTTPProblem, problem_for
from .session import Session

log = logging.getLogger("backchannel.tcp")

SERVER_NAME = f"backchannel/{__version__}"
#: Publishes in flight on one connection before it stops reading.
MAX_IN_FLIGHT = 64


def tcp_frame(message: Message) -> bytes:
    return message.tcp


class TcpConnection(asyncio.Protocol):
    def __init__(self, server: TcpServer) -> None:
        self.server = server
        self.hub: Hub = server.hub
        self.codec = frames.Connection(frames.Role.SERVER, max_frame=server.max_frame)
        self.session = Session(
            self.hub,
            self,
            tcp_frame,
            transport="tcp",
            max_subscriptions=server.max_subscriptions,
            identity=None if server.auth.enabled else ANONYMOUS,
        )
        self._authenticated = False
        self._expiry: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.close_reason: CloseReason | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._publishing: set[asyncio.Task[None]] = set()
        self._reading_paused = False
        self._drop_timer: asyncio.TimerHandle | None = None
        self._hello_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.hub.attach(self)
        except Unavailable:
            self.close(CloseReason.SHUTTING_DOWN)
            return
        self.server.connections.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            self.server.hello_timeout, self._hello_timed_out
        )

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        if self.close_reason is None and self.codec.state is frames.State.AWAITING_HELLO:
            self._fail(
                "request-timeout",
                f"no HELLO within {self.server.hello_timeout:g} s (header_timeout)",
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self.close_reason is None:
            self.close_reason = CloseReason.UNSUBSCRIBED
        self.session.close()
        self.hub.detach(self)
        self.server.connections.discard(self)
        if self._expiry is not None:
            self._expiry.cancel()
        for task in self._publishing:
            task.cancel()
        self._writable.set()
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self.close_reason is not None:
            return
        codec = self.codec
        try:
            codec.receive_data(data)
            while True:
                event = codec.next_event()
                if event is frames.NEED_DATA:
                    break
                if event is frames.CONNECTION_CLOSED:
                    self.close(CloseReason.UNSUBSCRIBED)
                    break
                self._handle(event)
        except frames.RemoteProtocolError as exc:
            self._fail(exc.error_type, str(exc))
        self.flush()

    def eof_received(self) -> bool | None:
        with contextlib.suppress(frames.ProtocolError):
            self.codec.receive_data(b"")
        return None  # close our side too

    # -- commands -----------------------------------------------------------------------------

    def _send(self, frame: frames.ServerFrame) -> None:
        self.write(self.codec.send(frame))

    def _handle(self, event: frames.Event) -> None:
        if isinstance(event, frames.Hello):
            if self._hello_timer is not None:
                self._hello_timer.cancel()
                self._hello_timer = None
            assert self.codec.version is not None
            self._send(
                frames.Welcome(
                    version=self.codec.version, max_frame=self.codec.max_frame, server=SERVER_NAME
                )
            )
            return
        request = getattr(event, "request", 0)
        try:
            if isinstance(event, frames.Subscribe):
                if event.after is not None and event.after > MAX_SEQ:
                    raise HTTPProblem("invalid-cursor", "after is beyond the largest message id")
                self.session.subscribe(
                    event.channel, event.after, lambda: self._send(frames.Ok(request=request))
                )
            elif isinstance(event, frames.Unsubscribe):
                self.session.unsubscribe(event.channel)
                self._send(frames.Ok(request=request))
            elif isinstance(event, frames.Publish):
                task = asyncio.get_running_loop().create_task(self._publish(event))
                self._publishing.add(task)
                task.add_done_callback(self._published)
                if len(self._publishing) >= MAX_IN_FLIGHT and self.transport is not None:
                    self.transport.pause_reading()
                    self._reading_paused = True
            elif isinstance(event, frames.Ping):
                self._send(frames.Pong(request=request))
            elif isinstance(event, frames.Auth):
                self._auth(event)
        except HTTPProblem as problem:
            self._error(request, problem.type.slug, problem.detail)
        except BackchannelError as exc:
            self._error(request, problem_for(exc).type.slug, exc.detail)

    def _auth(self, event: frames.Auth) -> None:
        if self._authenticated:
            raise HTTPProblem("invalid-command", "AUTH may be sent once per connection")
        self._authenticated = True
        auth = self.server.auth
        try:
            identity = auth.authenticate(event.token)
        except HTTPProblem as problem:
            # A token that does not verify ends the connection, as a refused upgrade would.
            self._fail(problem.type.slug, problem.detail)
            return
        self.session.identity = identity
        self._send(frames.Ok(request=event.request))
        if identity.expires is not None:
            left = max(0.0, identity.expires - auth.clock())
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(left, self._expired)

    def _expired(self) -> None:
        self.close(CloseReason.TOKEN_EXPIRED)

    async def _publish(self, event: frames.Publish) -> None:
        try:
            appended = await self.session.publish(
                event.channel, event.data, event.content_type, event.idempotency_key
            )
        except HTTPProblem as problem:
            self._error(event.request, problem.type.slug, problem.detail)
        except BackchannelError as exc:
            self._error(event.request, problem_for(exc).type.slug, exc.detail)
        else:
            message = appended.message
            if self.close_reason is None:
                self._send(
                    frames.Published(
                        request=event.request, seq=message.seq, time_ms=message.time_ms
                    )
                )
        self.flush()

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishing.discard(task)
        if self._reading_paused and len(self._publishing) < MAX_IN_FLIGHT // 2:
            self._reading_paused = False
            if self.transport is not None and self.close_reason is None:
                self.transport.resume_reading()

    def _error(self, request: int, slug: str, detail: str) -> None:
        if self.close_reason is None:
            self._send(frames.Error(request=request, type=slug, detail=detail[:1000]))

    def _fail(self, slug: str, detail: str) -> None:
        """Report a connection-level error and close."""
        with contextlib.suppress(frames.LocalProtocolError):
            self.write(self.codec.send(frames.Error(request=0, type=slug, detail=detail[:1000])))
        self.close(CloseReason.FAILED)

    # -- Sink ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.close_reason is not None:
            return  # closing: what is queued is all the connection will get
        self._out.append(data)
        self._out_size += len(data)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            self._out_size = 0
            self.transport.write(data)

    def buffered(self) -> int:
        pending = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self._out_size + pending

    async def drained(self) -> None:
        # The transport pauses us above its high-water mark and resumes us below its low one:
        # that is "drained" enough for a replay to go on.
        if self.close_reason is None:
            self.flush()
            await self._writable.wait()

    def close(self, reason: CloseReason) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        transport = self.transport
        if transport is None:
            return
        if reason is CloseReason.SLOW_CONSUMER:
            # What the transport holds (about max_outbound_bytes) goes out, then the ERROR
            # frame, if the client reads it all within the grace period; else it is dropped.
            self._out.clear()
            self.session.close()  # it gets nothing more: stop counting it as a subscriber
            grace = self.server.slow_consumer_grace
            if grace <= 0:
                transport.abort()
                return
            self._fail_frame("slow-consumer", "fell more than max_outbound_bytes behind")
            transport.close()
            self._drop_timer = asyncio.get_running_loop().call_later(grace, transport.abort)
            return
        if reason is CloseReason.SHUTTING_DOWN:
            self._fail_frame("shutting-down", "the hub is stopping; reconnect and resume")
        elif reason is CloseReason.TOKEN_EXPIRED:
            self._fail_frame(
                "token-expired", "the token expired: reconnect with a new one and resume"
            )
        self.flush()
        transport.close()

    def _fail_frame(self, slug: str, detail: str) -> None:
        with contextlib.suppress(frames.LocalProtocolError):
            data = self.codec.send(frames.Error(request=0, type=slug, detail=detail))
            if self.transport is not None:
                self.transport.write(data)

    @property
    def closed(self) -> bool:
        return self.close_reason is not None


class RefusedConnection(asyncio.Protocol):
    """A connection past ``max_connections``: one ERROR frame (``too-many-connections``,
    request 0), then the connection is closed (see :class:`~.limits.Refusal`)."""

    def __init__(self, limit: ConnectionLimit) -> None:
        self.limit = limit
        self.refusal: Refusal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        codec = frames.Connection(frames.Role.SERVER)
        frame = codec.send(
            frames.Error(
                request=0,
                type="too-many-connections",
                detail=f"the hub has {self.limit.limit} connections open (max_connections); "
                "retry later",
            )
        )
        self.refusal = Refusal(self.limit, cast(asyncio.Transport, transport), frame)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refusal is not None:
            self.refusal.done()


class TcpServer:
    """Listens for TCP connections and serves the binary protocol on them."""

    def __init__(
        self,
        hub: Hub,
        *,
        max_message_bytes: int,
        max_subscriptions: int,
        auth: Authenticator | None = None,
        slow_consumer_grace: float = 5.0,
        hello_timeout: float = 10.0,
        limit: ConnectionLimit | None = None,
        backlog: int,
    ) -> None:
        self.hub = hub
        self.backlog = backlog
        self.auth = auth or Authenticator(())
        self.slow_consumer_grace = slow_consumer_grace
        # Room for a message of max_message_bytes plus the fields around it.
        self.max_frame = max(frames.DEFAULT_MAX_FRAME, max_message_bytes + 65_536)
        self.max_subscriptions = max_subscriptions
        self.hello_timeout = hello_timeout
        self.connections: set[TcpConnection] = set()
        self.limit = limit
        if limit is not None:
            limit.track(self.connections)
        self._server: asyncio.Server | None = None

    def _accept(self) -> asyncio.Protocol:
        if self.limit is not None and self.limit.full(pending=1):
            return RefusedConnection(self.limit)
        return TcpConnection(self)

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, sock=sock, backlog=self.backlog)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
