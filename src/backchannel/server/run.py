"""Process start-up: ``backchannel serve`` runs the app under uvicorn."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import socket
import sys
from typing import Any

import uvicorn

from .app import BackchannelApp
from .config import Settings
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
        banner: str,
        tcp_socket: socket.socket | None,
        limit: ConnectionLimit,
    ) -> None:
        super().__init__(config)
        self._app = app
        self._banner = banner
        self._tcp_socket = tcp_socket
        self._tcp: TcpServer | None = None
        self._limit = limit
        # uvicorn's set of open HTTP and WebSocket connections (an upgraded connection moves
        # from its HTTP protocol to its WebSocket one), counted with the TCP server's own.
        limit.track(self.server_state.connections)

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
                hello_timeout=settings.header_timeout,
                limit=self._limit,
            )
            await self._tcp.start(self._tcp_socket)
        # Tests and scripts wait for this line; keep its shape.
        print(f"backchannel listening on {self._banner}", flush=True)

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


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"backchannel: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = BackchannelApp(settings)
    except ValueError as exc:
        raise SystemExit(f"backchannel: {exc}") from None
    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    banner = f"http://{shown_host}:{port}"
    tcp_socket = None
    if settings.tcp:
        tcp_socket = _bind(settings.host, settings.tcp_port)
        banner += f" and tcp://{shown_host}:{tcp_socket.getsockname()[1]}"
    banner += f" (store: {settings.store_url})"
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
        # A publish over /v1/ws carries the body as JSON or base64: room for that, no more.
        ws_max_size=settings.max_message_bytes * 4 // 3 + 65_536,
        ws_per_message_deflate=False,
        server_header=False,
        date_header=True,
    )
    server = _Server(config, app, banner, tcp_socket, limit)
    # uvicorn re-raises the signal that stopped it once shutdown is done, with the handler that
    # was in place before it started; a no-op handler makes a graceful SIGTERM exit with 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
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
