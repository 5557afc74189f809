"""No input produces a 500: random paths, queries, headers and bodies against the ASGI app."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backchannel import Settings, create_app
from backchannel.store import MemoryStore

segments = st.one_of(
    st.sampled_from(
        [
            *("v1", "channels", "messages", "news", "problems", "docs", "healthz", ""),
            *("queues", "jobs", "batch", "claim", "results", "events", "0" * 32),
        ]
    ),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
    st.binary(max_size=6).map(lambda b: "".join(f"%{c:02X}" for c in b)),
)
queries = st.lists(
    st.tuples(
        st.sampled_from(["after", "limit", "wait", "x", "max", "id", "changes", "lease"]),
        st.one_of(st.text(max_size=20), st.integers(-5, 2000).map(str), st.just("0.01")),
    ),
    max_size=3,
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "text/plain",
            "text/plain; charset=latin1",
            "application/octet-stream",
            "a/b/c",
            "application/foo+json",
            "",
        ]
    ),
    st.text(max_size=30),
)


def run(app, method: str, path: str, query: bytes, headers: list, body: bytes) -> int:  # type: ignore[no-untyped-def]
    sent: list[dict[str, object]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode("latin-1"),
        "query_string": query,
        "headers": headers,
        "root_path": "",
    }

    async def go() -> None:
        await app.startup()
        await app(scope, receive, send)

    asyncio.run(go())
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) <= 1
    return int(starts[0]["status"]) if starts else 0  # type: ignore[call-overload]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    parts=st.lists(segments, min_size=1, max_size=5),
    query=queries,
    content_type=content_types,
    key=st.one_of(st.none(), st.text(max_size=8)),
    body=st.one_of(
        st.binary(max_size=64),
        st.sampled_from(
            [
                b'{"jobs": [{"payload": 1}, {"payload": [], "max_attempts": 2}, 7]}',
                b'{"jobs": [{"payload": 1, "idempotency_key": ""}]}',
                b'{"results": [{"id": "x", "lease": "y", "result": 1}, {"id": 1}]}',
                b'{"results": [{"id": "' + b"0" * 32 + b'", "lease": "", "error": ""}]}',
                b'{"ids": ["00000000000000000000000000000000", "x"], "changes": "all"}',
                b'{"ids": "x"}',
            ]
        ),
    ),
)
def test_no_input_gets_a_server_error(method, parts, query, content_type, key, body) -> None:  # type: ignore[no-untyped-def]
    app = create_app(Settings(max_wait=0.01), store=MemoryStore())
    path = "/" + "/".join(parts)
    qs = "&".join(f"{quote(k)}={quote(v)}" for k, v in query).encode()
    headers = []
    if content_type is not None:
        headers.append((b"content-type", content_type.encode("utf-8", "replace")))
    if key is not None:
        headers.append((b"idempotency-key", key.encode("utf-8", "replace")))
    status = run(app, method, path, qs, headers, body)
    assert status != 0 and status < 500, (method, path, qs, headers, body, status)


def test_channel_paths_reach_the_handlers() -> None:
    """The fuzzer above is only worth something if its requests get past the router."""
    app = create_app(Settings(), store=MemoryStore())
    assert run(app, "POST", "/v1/channels/news/messages", b"", [], b"x") == 201
    assert run(app, "GET", "/v1/channels/news/messages", b"wait=0.01", [], b"") == 200
    batch = b'{"jobs": [{"payload": 1}]}'
    assert run(app, "POST", "/v1/queues/news/jobs/batch", b"", [], batch) == 200
    assert run(app, "POST", "/v1/queues/news/claim", b"max=2", [], b"") == 200
    assert run(app, "POST", "/v1/queues/news/results", b"", [], b'{"results": []}') == 200
