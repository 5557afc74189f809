"""Requests and responses over ASGI: the little the handlers need, with limits built in."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

import orjson

from .asgi import Receive, Scope, Send
from .auth import ANONYMOUS, Identity, bearer_token
from .problems import CONTENT_TYPE as PROBLEM_CONTENT_TYPE
from .problems import HTTPProblem

if TYPE_CHECKING:
    from .app import BackchannelApp
    from .router import Endpoint

T = TypeVar("T")
JSON = b"application/json"
MAX_QUERY_PARAMS = 50


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes | None = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, send: Send, *, head: bool = False) -> None:
        """Send the response; for a HEAD request, everything but the body."""
        headers = list(self.headers)
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type))
        headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


def json_response(
    status: int, document: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return Response(status, orjson.dumps(document), JSON, headers or [])


def problem_response(problem: HTTPProblem, instance: str, root_path: str = "") -> Response:
    """The problem as a response. ``root_path`` (where the app is mounted) prefixes the type
    URI and the instance, so both resolve against the host."""
    return Response(
        problem.type.status,
        problem.body(root_path + instance, root_path),
        PROBLEM_CONTENT_TYPE,
        list(problem.headers),
    )


class Request:
    """One HTTP request: its route parameters, headers, query and (bounded) body, and the ASGI
    ``send`` for endpoints that stream their response themselves."""

    __slots__ = (
        "_headers",
        "_pairs",
        "app",
        "endpoint",
        "identity",
        "params",
        "path",
        "receive",
        "scope",
        "send",
        "streaming",
    )

    def __init__(
        self,
        app: BackchannelApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        endpoint: Endpoint,
        params: dict[str, str],
    ) -> None:
        self.app = app
        self.endpoint = endpoint
        #: Set by an endpoint once it has started its own response: from then on errors can
        #: only end the stream, not become a problem document.
        self.streaming = False
        self.scope = scope
        self.receive = receive
        self.send = send
        self.path = path
        self.params = params
        #: Who is calling: set by the app from the request's token before the endpoint runs.
        self.identity: Identity = ANONYMOUS
        self._headers: dict[bytes, bytes] | None = None
        self._pairs: list[tuple[str, str]] | None = None

    @property
    def method(self) -> str:
        method: str = self.scope["method"]
        return method

    def header(self, name: bytes) -> str | None:
        """The header's value (latin-1), or ``None``; ``name`` is lowercase."""
        if self._headers is None:
            self._headers = {}
            for key, value in self.scope["headers"]:
                self._headers.setdefault(key.lower(), value)
        value = self._headers.get(name)
        return None if value is None else value.decode("latin-1")

    def _query_pairs(self) -> list[tuple[str, str]]:
        if self._pairs is None:
            raw = self.scope.get("query_string", b"").decode("latin-1")
            try:
                self._pairs = parse_qsl(
                    raw, keep_blank_values=True, max_num_fields=MAX_QUERY_PARAMS
                )
            except ValueError:
                raise HTTPProblem(
                    "invalid-parameter", f"more than {MAX_QUERY_PARAMS} query parameters"
                ) from None
        return self._pairs

    def query(self, *, repeatable: frozenset[str] = frozenset()) -> dict[str, str]:
        """Query parameters; a parameter given twice is an ``invalid-parameter`` problem unless
        it is ``repeatable`` (read those with :meth:`query_all`)."""
        query: dict[str, str] = {}
        for key, value in self._query_pairs():
            if key in query and key not in repeatable:
                raise HTTPProblem("invalid-parameter", f"{key!r} is given more than once")
            query[key] = value
        return query

    def query_all(self, name: str) -> list[str]:
        return [value for key, value in self._query_pairs() if key == name]

    def query_whole(self, name: str) -> int | None:
        """A query parameter that is a whole number, if given."""
        value = self.query().get(name)
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or len(value) > 12:
            raise HTTPProblem(
                "invalid-parameter", f"{name} must be a whole number, not {value[:40]!r}"
            )
        return int(value)

    def query_seconds(self, name: str) -> float | None:
        """A query parameter that is a finite number of seconds, if given."""
        value = self.query().get(name)
        if value is None:
            return None
        try:
            seconds = float(value) if len(value) <= 32 else math.nan
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise HTTPProblem(
                "invalid-parameter", f"{name} must be a number of seconds, not {value[:40]!r}"
            )
        return seconds

    def authenticate(self, token_in_query: bool) -> Identity:
        """Verify the request's bearer token (a 401 problem if it does not pass) and remember
        who is calling in :attr:`identity`."""
        auth = self.app.auth
        if auth.enabled:
            query_token = None
            if token_in_query:
                given = self.query_all("token")
                if len(given) > 1:
                    raise HTTPProblem("invalid-parameter", "'token' is given more than once")
                query_token = given[0] if given else None
            self.identity = auth.authenticate(
                bearer_token(self.header(b"authorization"), query_token)
            )
        return self.identity

    def seconds_left(self) -> float | None:
        """Seconds until the caller's token expires; None when it never does."""
        expires = self.identity.expires
        return None if expires is None else max(0.0, expires - self.app.auth.clock())

    def cap_wait(self, wait: float) -> float:
        """A wait of ``wait`` seconds, cut so it ends when the caller's token expires."""
        left = self.seconds_left()
        return wait if left is None else min(wait, left)

    async def body(self, max_bytes: int, limit_name: str = "max_message_bytes") -> bytes:
        """The whole body, or a ``message-too-large`` problem as soon as it passes ``max_bytes``
        (``limit_name`` says which limit that is)."""
        declared = self.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes, limit_name)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes, limit_name)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def until_disconnected(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` unless the client goes away first, in which case it is cancelled and
        :class:`ClientDisconnected` raised. Call once the body has been read."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected
        return task.result()

    async def _disconnected(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass


class ClientDisconnected(Exception):
    """The client went away; there is nobody to answer."""


def _too_large(max_bytes: int, limit_name: str) -> HTTPProblem:
    return HTTPProblem(
        "message-too-large",
        f"the body is larger than {max_bytes} bytes ({limit_name})",
        max_bytes=max_bytes,
    )
