"""Endpoints about the hub itself: health, readiness, the OpenAPI document, problem types."""

from __future__ import annotations

import html

import orjson

from ..core.errors import Unavailable
from .http import JSON, Request, Response, json_response
from .problems import PROBLEM_TYPES, HTTPProblem


async def healthz(request: Request) -> Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await request.app.hub.ready()
    except Unavailable as exc:
        raise HTTPProblem("unavailable", exc.detail, headers=[(b"retry-after", b"1")]) from None
    return json_response(200, {"status": "ready"})


async def openapi(request: Request) -> Response:
    return Response(200, request.app.openapi_json, JSON)


async def docs(request: Request) -> Response:
    """The OpenAPI document: as JSON, or as a page for a browser that asks for HTML."""
    accept = request.header(b"accept") or ""
    if "text/html" not in accept:
        return await openapi(request)
    spec = orjson.loads(request.app.openapi_json)
    rows = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(operation.get('summary', ''))}</td></tr>"
            )
    page = (
        "<!doctype html><meta charset=utf-8><title>backchannel API</title>"
        "<style>body{font:15px system-ui;margin:2em}"
        "td{padding:.3em 1em;border-bottom:1px solid #ddd}"
        "</style><h1>backchannel HTTP API</h1><p>The OpenAPI document is at "
        "<a href=openapi.json>openapi.json</a>.</p><table>" + "".join(rows) + "</table>"
    )
    return Response(200, page.encode(), b"text/html; charset=utf-8")


async def problem_type(request: Request) -> Response:
    slug = request.params["slug"]
    problem = PROBLEM_TYPES.get(slug)
    if problem is None:
        raise HTTPProblem("not-found", f"there is no problem type {slug[:60]!r}")
    return json_response(
        200,
        {
            "type": (request.scope.get("root_path") or "") + problem.uri,
            "title": problem.title,
            "status": problem.status,
            "description": problem.description,
        },
    )
