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

Only the body chunks take this path. The response start, flow-control waits (an empty chunk
through ``send``) and the end of the response still go through ``send``, so uvicorn's view of
the response stays true. Under any other server, or when anything wraps ``send``, the function
returns None and streams use plain ASGI.
"""

from __future__ import annotations

import asyncio
from typing import cast

from .asgi import Send

_UVICORN_HTTPTOOLS = "uvicorn.protocols.http.httptools_impl"


def direct_transport(send: Send) -> asyncio.Transport | None:
    """The transport a started, chunked uvicorn (httptools) response may be written to."""
    cycle = getattr(send, "__self__", None)
    if cycle is None or type(cycle).__module__ != _UVICORN_HTTPTOOLS:
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
    if protocol is None or type(protocol).__module__ not in _UVICORN_WEBSOCKETS:
        return None
    transport = getattr(protocol, "transport", None)
    if transport is None or transport.is_closing() or not hasattr(transport, "writelines"):
        return None
    return cast(asyncio.Transport, transport)
