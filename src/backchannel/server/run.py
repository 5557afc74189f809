"""Process start-up: ``backchannel serve`` runs the app under uvicorn."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import re
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from ..store import shown_url
from .app import BackchannelApp
from .auth import exposure_error, is_loopback
from .config import Settings
from .fastpath import DETACHED
from .limits import ConnectionLimit, derived_max_connections, raise_file_limit
from .tcp import TcpServer

log = logging.getLogger("backchannel")

GRACEFUL_SHUTDOWN_SECONDS = 5
PUSH_GOODBYE_SECONDS = 1.0


class _Server(uvicorn.Server):
    """uvicorn's server, with the TCP protocol's listener beside it, telling the hub when
    shutdown starts so that long polls answer and streams end at once instead of holding the
    process for up to their full wait."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: BackchannelApp,
        on_ready: Callable[[], None],
        tcp_socket: socket.socket | None,
        limit: ConnectionLimit,
    ) -> None:
        super().__init__(config)
        self._app = app
        self._on_ready = on_ready
        self._tcp_socket = tcp_socket
        self._tcp: TcpServer | None = None
        self._limit = limit
        # uvicorn's set of open HTTP and WebSocket connections (an upgraded connection moves
        # from its HTTP protocol to its WebSocket one), the event streams taken out of it
        # (fastpath.take_over), and the TCP server's own connections.
        limit.track(self.server_state.connections)
        limit.track(DETACHED)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        if self._tcp_socket is not None:
            settings = self._app.settings
            self._tcp = TcpServer(
                self._app.hub,
                max_message_bytes=settings.max_message_bytes,
                max_subscriptions=settings.max_subscriptions,
                auth=self._app.auth,
                slow_consumer_grace=settings.slow_consumer_grace,
                hello_timeout=settings.header_timeout,
                limit=self._limit,
                backlog=settings.listen_backlog,
            )
            await self._tcp.start(self._tcp_socket)
        self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._tcp is not None:
            self._tcp.stop_accepting()
        hub = self._app.hub
        hub.begin_shutdown()
        self._app.jobs.begin_shutdown()
        # Let the streams send their own goodbyes (SSE retry:, WebSocket 1001) before uvicorn
        # closes what is left with its generic ones.
        deadline = asyncio.get_running_loop().time() + PUSH_GOODBYE_SECONDS
        while hub.fanout.busy() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await super().shutdown(sockets)
        if self._tcp is not None:
            await self._tcp.wait_closed()


_TOKEN_PARAM = re.compile(r"(?<=[?&]token=)[^&\s]*")


def _redact_tokens(record: logging.LogRecord) -> bool:
    """Keep ``?token=`` values out of uvicorn's access log (it logs the path with its query)."""
    if isinstance(record.args, tuple):
        record.args = tuple(
            _TOKEN_PARAM.sub("REDACTED", a) if isinstance(a, str) and "token=" in a else a
            for a in record.args
        )
    return True


def bind(host: str, port: int, *, backlog: int | None, reuse_port: bool = False) -> socket.socket:
    """A socket bound to ``host:port``, listening with ``backlog`` unless that is None; with
    ``reuse_port``, one that other processes of this user can bind to the same port as well
    (see :mod:`.workers`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"backchannel: cannot listen on {host}:{port}: {exc.strerror}") from None
    if backlog is not None:
        sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def make_app(settings: Settings) -> BackchannelApp:
    try:
        return BackchannelApp(settings)
    except ValueError as exc:
        raise SystemExit(f"backchannel: {exc}") from None


def banner(settings: Settings, port: int, tcp_port: int | None) -> str:
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    text = f"http://{shown_host}:{port}"
    if tcp_port is not None:
        text += f" and tcp://{shown_host}:{tcp_port}"
    return text + f" (store: {shown_url(settings.store_url)})"


def serve(settings: Settings) -> None:
    configure_logging(settings)
    app = make_app(settings)
    # Before binding: a hub that must not start never listens, not even for a moment.
    refusal = exposure_error(settings, app.auth.enabled)
    if refusal is not None:
        raise SystemExit(f"backchannel: {refusal}")
    if not app.auth.enabled and not is_loopback(settings.host):
        log.warning("serving on %s without authentication (--insecure)", settings.host)
    log.info("%s", app.auth.describe())
    if settings.workers > 1:
        from .workers import supervise

        supervise(settings)
        return
    backlog = settings.listen_backlog
    sock = bind(settings.host, settings.port, backlog=backlog)
    tcp_socket = bind(settings.host, settings.tcp_port, backlog=backlog) if settings.tcp else None
    shown = banner(
        settings,
        sock.getsockname()[1],
        tcp_socket.getsockname()[1] if tcp_socket is not None else None,
    )
    # Tests and scripts wait for this line; keep its shape.
    run_server(
        app, sock, tcp_socket, lambda: print(f"backchannel listening on {shown}", flush=True)
    )


#: Collections of the middle generation between two full collections (CPython's default: 10).
FULL_COLLECTION_EVERY = 100


def tune_gc() -> None:
    """Make full garbage collections rare and shorter in a long-running hub process.

    A full collection walks every tracked object and stops the event loop meanwhile. While
    10,000 subscribers connected at once, CPython's defaults ran 5 of them, the longest 158 ms
    (every stream waited); with one every 100 middle-generation collections instead of 10,
    one ran, 21 ms. What start-up created (modules, classes, the app: objects that live as
    long as the process) is frozen out of every later collection. Only for the process
    ``backchannel serve`` runs: a hub mounted in another app leaves its GC alone."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def run_server(
    app: BackchannelApp,
    sock: socket.socket,
    tcp_socket: socket.socket | None,
    on_ready: Callable[[], None],
) -> None:
    """Serve on the sockets until a signal stops the server; ``on_ready`` once listening.
    Exits with status 3 if the app did not start."""
    settings = app.settings
    limit = ConnectionLimit(settings.max_connections or derived_max_connections(raise_file_limit()))
    http: Any = "h11"
    if importlib.util.find_spec("httptools"):
        from .protocol import http_protocol

        http = http_protocol(settings, limit)
    else:  # pragma: no cover - httptools is a dependency on CPython
        log.warning(
            "httptools is missing: header_timeout, max_header_bytes and max_connections "
            "do not apply to HTTP"
        )
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level=settings.log_level,
        access_log=settings.access_log,
        http=http,
        # wsproto answers a Close frame that arrives inside a fragmented message with a normal
        # close; websockets fails the connection with 1002 (Autobahn case 7.1.5).
        ws="wsproto",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        ws_max_size=settings.ws_max_size,
        ws_per_message_deflate=False,
        server_header=False,
        date_header=True,
        backlog=settings.listen_backlog,
    )
    # After uvicorn's Config, which sets up its loggers.
    logging.getLogger("uvicorn.access").addFilter(_redact_tokens)
    server = _Server(config, app, on_ready, tcp_socket, limit)
    # uvicorn re-raises the signal that stopped it once shutdown is done, with the handler that
    # was in place before it started; a no-op handler makes a graceful SIGTERM exit with 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    tune_gc()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        if tcp_socket is not None:
            tcp_socket.close()
    if not server.started:
        sys.exit(3)
