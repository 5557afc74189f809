"""The ServeMux: matches a method and path to a route. Routes are declared in :mod:`.routes`.

Patterns are paths whose segments are literals or ``{name}`` placeholders; a placeholder
matches one whole, percent-decoded segment (so a channel name can never contain ``/``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .asgi import Scope

if TYPE_CHECKING:
    from .http import Request, Response

#: An endpoint answers with a Response, or None when it has streamed its response itself.
Endpoint = Callable[["Request"], Awaitable["Response | None"]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    endpoint: Endpoint
    summary: str
    #: Answered without a token even when the hub has auth (health, the API's description).
    public: bool = False
    #: Takes the token as ``?token=`` too: event streams and WebSockets, which browsers open
    #: without a way to add an Authorization header.
    token_in_query: bool = False
    #: The name of a bool setting that turns the route on; while it is off, the route does
    #: not exist (see :func:`.routes.serve_mux`).
    setting: str | None = None
    segments: tuple[str, ...] = field(init=False)
    #: Placeholders by position, 1 for a placeholder and 0 for a literal: of two patterns that
    #: match a path, the smaller is the more specific (a literal beats a placeholder).
    specificity: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        segments = tuple(self.path.strip("/").split("/"))
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "specificity", tuple(int(s.startswith("{")) for s in segments))

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, segment in zip(self.segments, segments, strict=True):
            if pattern.startswith("{"):
                params[pattern[1:-1]] = segment
            elif pattern != segment:
                return None
        return params


@dataclass(frozen=True)
class Matched:
    route: Route
    params: dict[str, str]


@dataclass(frozen=True)
class NoRoute:
    allowed: tuple[str, ...]  # methods the path takes; empty when the path is unknown


class ServeMux:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        seen = set()
        for route in self.routes:
            if (route.method, route.segments) in seen:
                raise ValueError(f"route declared twice: {route.method} {route.path}")
            seen.add((route.method, route.segments))

    def match(self, method: str, path: str) -> Matched | NoRoute:
        """The route for ``method`` and ``path``; a GET route answers HEAD too."""
        wanted = "GET" if method == "HEAD" else method
        segments = [unquote(s, errors="replace") if "%" in s else s for s in _split(path)]
        found: list[tuple[Route, dict[str, str]]] = []
        for route in self.routes:
            params = route.match(segments)
            if params is not None:
                found.append((route, params))
        if not found:
            return NoRoute(())
        # The most specific pattern owns the path: /v1/jobs/events shadows /v1/jobs/{job}, for
        # every method (so DELETE /v1/jobs/events is a 405, not a cancel of job "events").
        best = min(route.specificity for route, _ in found)
        allowed: list[str] = []
        for route, params in found:
            if route.specificity != best:
                continue
            if route.method == wanted:
                return Matched(route, params)
            allowed.append(route.method)
            if route.method == "GET":
                allowed.append("HEAD")
        return NoRoute(tuple(allowed))


def _split(path: str) -> list[str]:
    return path.strip("/").split("/") if path.strip("/") else [""]


def request_path(scope: Scope) -> str:
    """The raw (still percent-encoded) path of an ASGI scope, below its ``root_path``.

    Servers and routers that mount apps (uvicorn, Starlette's ``Mount``) keep the full path in
    ``path``/``raw_path`` and the prefix in ``root_path``.
    """
    raw = scope.get("raw_path")
    root: str = scope.get("root_path") or ""
    if isinstance(raw, bytes):
        path = raw.decode("latin-1").split("?", 1)[0]
        root = root.encode("utf-8").decode("latin-1")
    else:
        path = str(scope.get("path") or "/")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path
