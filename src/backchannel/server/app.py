"""The ASGI application: routing, error mapping, and the hub's life cycle.

``create_app()`` returns an ASGI app that runs under any ASGI server, and can be mounted inside
a Starlette or FastAPI app. It starts its store on the ASGI lifespan startup event, or on the
first request when the host does not forward lifespan events to mounted apps (Starlette's
``Mount`` does not); call :meth:`BackchannelApp.shutdown` from the host's own shutdown to close
the store cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson

from ..core.errors import (
    BackchannelError,
)
from ..core.hub import Hub
from ..core.jobqueue import JobQueue
from ..core.store import Store
from ..store import open_store
from . import openapi
from .asgi import Receive, Scope, Send
from .auth import Authenticator
from .config import Settings
from .http import ClientDisconnected, Request, Response, problem_response
from .problems import HTTPProblem, problem_for
from .router import Matched, request_path
from .routes import serve_mux
from .sse import Heartbeats

log = logging.getLogger("backchannel.server")


class BackchannelApp:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or Settings()
        # Before the store: a key that cannot be loaded stops the app before it opens files.
        self.auth = Authenticator.from_settings(self.settings, clock)
        if store is None:
            store = open_store(
                self.settings.store_url,
                retention=self.settings.retention,
                idempotency_ttl_ms=int(self.settings.idempotency_ttl * 1000),
                sqlite_synchronous="full"
                if self.settings.sqlite_synchronous == "full"
                else "normal",
            )
        self.hub = Hub(store, limits=self.settings.limits, clock=clock)
        self.jobs = JobQueue(store, limits=self.settings.job_limits, now_ms=self.hub.now_ms)
        self.heartbeats = Heartbeats(self.settings.sse_heartbeat)
        self.mux = serve_mux(self.settings)
        self.openapi_json = orjson.dumps(openapi.build(self.settings))
        self._start_lock = asyncio.Lock()
        self._stopped = False  # after shutdown(), requests get 503 instead of a lazy restart

    async def startup(self) -> None:
        async with self._start_lock:
            self._stopped = False
            if not self.hub.started:
                await self.hub.start()
                self.jobs.start()
                self.heartbeats.start()

    async def shutdown(self) -> None:
        self._stopped = True
        await self.heartbeats.stop()
        await self.jobs.stop()
        await self.hub.stop()

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """May a browser page from ``origin`` use the push endpoints? Same-origin pages always
        may; others only when listed in ``allowed_origins`` (or when it is ``*``)."""
        origins = self.settings.origins
        if "*" in origins or origin.rstrip("/") in origins:
            return True
        return host is not None and origin.split("://", 1)[-1].rstrip("/") == host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.error("startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = request_path(scope)
        root = scope.get("root_path") or ""
        request: Request | None = None
        try:
            request = self._route(scope, receive, send, path)
            if not self.hub.started and not self._stopped:
                await self.startup()
            response = await request.endpoint(request)
            if response is None:  # the endpoint streamed its response itself
                return
        except ClientDisconnected:
            return
        except Exception as exc:
            if request is not None and request.streaming:
                log.exception("stream %s ended by an error", path)
                return
            response = _error_response(exc, path, root)
        await response.send(send, head=scope["method"] == "HEAD")

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = request_path(scope)
        found = self.mux.match("WEBSOCKET", path)
        if not isinstance(found, Matched):
            # Refusing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        if not self.hub.started and not self._stopped:
            await self.startup()
        request = Request(self, scope, receive, send, path, found.route.endpoint, found.params)
        try:
            await found.route.endpoint(request)
        except Exception:
            log.exception("WebSocket %s ended by an error", path)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})

    def _route(self, scope: Scope, receive: Receive, send: Send, path: str) -> Request:
        found = self.mux.match(scope["method"], path)
        if not isinstance(found, Matched):
            if found.allowed:
                allow = ", ".join(found.allowed).encode()
                raise HTTPProblem(
                    "method-not-allowed",
                    f"{scope['method']} is not allowed here; use {allow.decode()}",
                    headers=[(b"allow", allow)],
                )
            raise HTTPProblem("not-found", f"no route for {path[:200]}")
        request = Request(self, scope, receive, send, path, found.route.endpoint, found.params)
        if not found.route.public:
            request.authenticate(found.route.token_in_query)
        return request


def _error_response(exc: Exception, path: str, root: str) -> Response:
    if isinstance(exc, HTTPProblem):
        return problem_response(exc, path, root)
    if isinstance(exc, BackchannelError):
        return problem_response(problem_for(exc), path, root)
    log.error("unhandled error answering %s", path, exc_info=exc)
    failure = HTTPProblem("internal-error", "the hub failed to answer; see its log")
    return problem_response(failure, path, root)


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
) -> BackchannelApp:
    """The hub as an ASGI application."""
    return BackchannelApp(settings, store=store, clock=clock)
