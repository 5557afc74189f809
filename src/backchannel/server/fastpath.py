"""Writing pushed bytes straight to the connection, under uvicorn.

Through ASGI, every chunk of a streamed response is one ``await send(...)``: a coroutine per
stream woken per message, then the server's framing and its ``transport.write``. For thousands
of subscribers that switching costs more than the writes. When the server is uvicorn's
``httptools`` protocol (what ``backchannel serve`` runs), ``send`` is a method of the
connection's request cycle, and for a chunked response it only frames the body and writes it to
the transport. :func:`direct_transport` finds that transport so a stream can write the same
chunks itself, from the fan-out engine's flush, with no coroutine in between.

WebSockets work the same way: uvicorn's WebSocket protocols (websockets, websockets-sansio,
wsproto) write every frame whole to the transport, so a whole, unmasked text frame written
between theirs is just one more frame. :func:`direct_ws_transport` finds that transport.

An event stream goes one step further: :func:`take_over` moves its connection out of uvicorn
altogether, once the response head and the first chunk are out. The request's task, its scope
and uvicorn's per-connection parser are freed, and a small :class:`DetachedStream` protocol is
all that stays with the socket: an idle subscriber then costs a few hundred bytes of Python
objects instead of a task with its coroutine chain (see "Idle memory" in docs/benchmarks.md).
From then on the stream writes its own chunks, including the last one, and closes the socket
itself; shutdown reaches it through the fan-out engine, not through uvicorn.

Otherwise only the body chunks take this path. The response start, flow-control waits (an
empty chunk through ``send``) and the end of the response still go through ``send``, so
uvicorn's view of the response stays true. Under any other server, or when anything wraps
``send``, the functions return None and streams use plain ASGI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from .asgi import Send

_UVICORN_HTTPTOOLS = "uvicorn.protocols.http.httptools_impl"


def _comes_from(obj: object, *modules: str) -> bool:
    """Is ``obj`` of a class defined in one of ``modules``, or of a subclass of one (a server
    may extend uvicorn's protocols, e.g. to add limits)?"""
    return any(cls.__module__ in modules for cls in type(obj).__mro__)


def direct_transport(send: Send) -> asyncio.Transport | None:
    """The transport a started, chunked uvicorn (httptools) response may be written to."""
    cycle = getattr(send, "__self__", None)
    if cycle is None or not _comes_from(cycle, _UVICORN_HTTPTOOLS):
        return None
    if getattr(cycle, "chunked_encoding", None) is not True:
        return None
    if getattr(cycle, "response_started", False) is not True:
        return None
    if getattr(cycle, "disconnected", True) or getattr(cycle, "response_complete", True):
        return None
    transport = getattr(cycle, "transport", None)
    if transport is None or not hasattr(transport, "writelines"):
        return None
    return cast(asyncio.Transport, transport)


_UVICORN_WEBSOCKETS = frozenset(
    {
        "uvicorn.protocols.websockets.websockets_sansio_impl",
        "uvicorn.protocols.websockets.websockets_impl",
        "uvicorn.protocols.websockets.wsproto_impl",
    }
)


def direct_ws_transport(send: Send) -> asyncio.Transport | None:
    """The transport an accepted uvicorn WebSocket may be written whole frames to."""
    protocol = getattr(send, "__self__", None)
    if protocol is None or not _comes_from(protocol, *_UVICORN_WEBSOCKETS):
        return None
    transport = getattr(protocol, "transport", None)
    if transport is None or transport.is_closing() or not hasattr(transport, "writelines"):
        return None
    return cast(asyncio.Transport, transport)


#: Every open connection taken over by :func:`take_over`, in this process: the connection limit
#: counts them with uvicorn's own (see :class:`.limits.ConnectionLimit`).
DETACHED: set[DetachedStream] = set()


class DetachedStream(asyncio.Protocol):
    """The protocol of a connection taken over from uvicorn by :func:`take_over`.

    The client has nothing more to say on a stream (uvicorn does not read a pipelined request
    behind one either), so what it sends is dropped. ``on_lost`` is called once the
    connection is gone, whoever closed it. :meth:`drained` waits out the transport's flow
    control, as an empty ``send`` would have.
    """

    __slots__ = ("_on_lost", "_paused", "_waiter", "transport")

    def __init__(self, transport: asyncio.Transport, on_lost: Callable[[], None]) -> None:
        self.transport = transport
        self._on_lost: Callable[[], None] | None = on_lost
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # a half-closed client is a gone client: close

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        DETACHED.discard(self)
        self._paused = False
        self._wake()
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drained(self) -> None:
        """Return once the transport takes writes again (or the connection is gone)."""
        while self._paused and not self.transport.is_closing():
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)


def take_over(send: Send, on_lost: Callable[[], None]) -> DetachedStream | None:
    """Move a started, chunked uvicorn (httptools) response's connection out of uvicorn.

    Returns the :class:`DetachedStream` now owning the transport, or None (and changes
    nothing) when the connection cannot be taken: another server, a request body still
    arriving, or a pipelined request waiting behind this one. After a take-over the ASGI
    call must return without sending anything more: uvicorn sees a client that went away, and
    neither logs nor closes. The caller writes the rest of the response, the final empty chunk
    included, to ``protocol.transport`` and closes it.
    """
    transport = direct_transport(send)
    if transport is None:
        return None
    cycle = getattr(send, "__self__", None)
    owner = getattr(getattr(cycle, "on_response", None), "__self__", None)
    if owner is None or not _comes_from(owner, _UVICORN_HTTPTOOLS):
        return None
    same_connection = getattr(owner, "transport", None) is transport
    if not same_connection:
        return None
    if getattr(cycle, "more_body", True) or getattr(owner, "pipeline", True):
        return None
    connections = getattr(owner, "connections", None)
    flow = getattr(owner, "flow", None)
    if not isinstance(connections, set) or flow is None:
        return None
    protocol = DetachedStream(transport, on_lost)
    protocol._paused = bool(getattr(flow, "write_paused", False))
    if getattr(flow, "read_paused", False):
        flow.resume_reading()
    transport.set_protocol(protocol)
    DETACHED.add(protocol)
    # Out of uvicorn's books: its shutdown no longer waits for this connection (the fan-out
    # engine ends it), and its request cycle, told the client left, lets the task end quietly.
    connections.discard(owner)
    setattr(cycle, "disconnected", True)  # noqa: B010 - an attribute of uvicorn's cycle
    return protocol
