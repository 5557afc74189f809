"""uvicorn's HTTP protocol (httptools) with the limits uvicorn does not have.

- **Header read timeout.** uvicorn waits forever for a request's line and headers: a client
  that sends them a byte at a time (slow-loris), or connects and sends nothing, holds its
  connection as long as it likes. Here a request's head must be complete ``header_timeout``
  seconds after it began (after the connection opened, for the first one); then the hub answers
  ``408`` ``request-timeout`` and closes. Idle keep-alive connections between requests are
  uvicorn's business (``timeout_keep_alive``).
- **Head size.** httptools buffers any amount of request line and headers. Past
  ``max_header_bytes`` of request target and header lines the hub answers ``431``
  ``request-head-too-large``; a head that never ends is cut once the bytes received for it pass
  that limit plus one read.
- **Connection limit.** Past ``max_connections`` open connections (see :mod:`.limits`) a new
  connection is answered at once, before it sends anything, ``503`` ``too-many-connections``
  with ``Retry-After`` and ``Connection: close``, and closed a moment later; its request, if
  any, is never parsed.
- **Malformed requests** get a ``400`` ``malformed-request`` problem document naming the
  parser's complaint, instead of uvicorn's plain-text line.

Everything else (pipelining, upgrades, flow control) is uvicorn's own code.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .config import Settings
from .limits import ConnectionLimit, Refusal
from .problems import CONTENT_TYPE, HTTPProblem

#: A head that is still incomplete after this many bytes past ``max_header_bytes`` is cut
#: without waiting for its end: room for the last read, which may also hold a previous body.
READ_SLACK = 256 * 1024


class _HeadTooLarge(Exception):
    pass


class HubHttpProtocol(HttpToolsProtocol):
    """One HTTP connection. :func:`http_protocol` makes the subclass that carries the settings."""

    header_timeout: float = 10.0
    max_head_bytes: int = 16_384
    connection_limit: ConnectionLimit | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_bytes = 0  # request target and header lines, as parsed
        self._head_received = 0  # bytes received while the head was incomplete
        self._refusal: Refusal | None = None

    # -- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.connection_limit
        if limit is not None and limit.full():
            problem = HTTPProblem(
                "too-many-connections",
                f"the hub has {limit.limit} connections open (max_connections); retry later",
            )
            self._refusal = Refusal(
                limit, transport, self._problem_bytes(problem, [(b"retry-after", b"1")])
            )
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._refusal is not None:
            self._refusal.done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # answered already: what it sends is dropped
        # uvicorn's own, but with problem documents for what the parser refuses.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
            else:
                raise
            return
        except httptools.HttpParserError as exc:
            self.logger.info("malformed HTTP request: %s", exc)
            self._answer("malformed-request", f"the request is not valid HTTP/1.1: {exc}")
            return
        if self._in_head and self.parser is not None and not self.transport.is_closing():
            self._head_received += len(data)
            if self._head_received > self.max_head_bytes + READ_SLACK:
                self._head_too_large()

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._head_received = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            raise _HeadTooLarge

    # -- answers the app never sees -------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined request waits behind a response being sent
            return
        self.logger.info("closed a connection that sent no complete request head in time")
        self._answer(
            "request-timeout",
            f"the request line and headers did not arrive within {self.header_timeout:g} s "
            "(header_timeout)",
        )

    def _head_too_large(self) -> None:
        self.logger.info("refused a request head larger than %d bytes", self.max_head_bytes)
        self._answer(
            "request-head-too-large",
            f"the request line and headers are larger than {self.max_head_bytes} bytes "
            "(max_header_bytes)",
        )

    def _answer(self, slug: str, detail: str) -> None:
        """Write a problem document and close, outside any request cycle."""
        self._cancel_head_timer()
        self._in_head = False
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # the app's response is under way: no room for ours
            return
        self.transport.write(self._problem_bytes(HTTPProblem(slug, detail)))
        self.transport.close()

    def _problem_bytes(
        self, problem: HTTPProblem, headers: list[tuple[bytes, bytes]] | None = None
    ) -> bytes:
        """A whole response carrying ``problem``, that closes the connection."""
        body = problem.body()
        head = [STATUS_LINE[problem.type.status]]
        for name, value in [*self.server_state.default_headers, *(headers or [])]:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: ",
            CONTENT_TYPE,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
        return b"".join(head)


def http_protocol(settings: Settings, limit: ConnectionLimit | None) -> type[HubHttpProtocol]:
    """The protocol class to pass to ``uvicorn.Config(http=...)``."""
    return type(
        "HttpProtocol",
        (HubHttpProtocol,),
        {
            "header_timeout": settings.header_timeout,
            "max_head_bytes": settings.max_header_bytes,
            "connection_limit": limit,
        },
    )
