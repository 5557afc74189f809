"""The HTTP API in process (ASGI), over the memory store."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from backchannel.server import BackchannelApp
from backchannel.server.problems import PROBLEM_TYPES

MESSAGES = "/v1/channels/news/messages"


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    document = response.json()
    assert document["type"] == f"/problems/{slug}"
    assert document["status"] == status
    assert document["title"] == PROBLEM_TYPES[slug].title
    assert isinstance(document["detail"], str) and document["detail"]
    return document  # type: ignore[no-any-return]


async def test_publish_answers_201_with_id_channel_time(client: httpx.AsyncClient) -> None:
    response = await client.post(MESSAGES, json={"n": 1})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "channel", "time"}
    assert body["id"] == "0000000000000001"
    assert body["channel"] == "news"
    assert body["time"].endswith("Z")


async def test_every_kind_of_body_comes_back_as_published(client: httpx.AsyncClient) -> None:
    await client.post(
        MESSAGES, content=b'{"a":  [1, 2.50]}', headers={"content-type": "application/json"}
    )
    await client.post(
        MESSAGES, content="héllo".encode(), headers={"content-type": "text/plain; charset=utf-8"}
    )
    await client.post(MESSAGES, content=b"\x00\xff", headers={"content-type": "image/png"})
    await client.post(MESSAGES, content=b"raw")  # no content type at all
    response = await client.get(MESSAGES)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert b'"data":{"a":  [1, 2.50]}' in response.content  # JSON kept byte for byte
    messages = response.json()["messages"]
    assert [(m["encoding"], m["content_type"]) for m in messages] == [
        ("json", "application/json"),
        ("text", "text/plain; charset=utf-8"),
        ("base64", "image/png"),
        ("base64", "application/octet-stream"),
    ]
    assert messages[0]["data"] == {"a": [1, 2.5]}
    assert messages[1]["data"] == "héllo"
    assert base64.b64decode(messages[2]["data"]) == b"\x00\xff"
    assert [m["id"] for m in messages] == sorted(m["id"] for m in messages)


async def test_short_poll_pages_with_next_after(client: httpx.AsyncClient) -> None:
    for i in range(5):
        await client.post(MESSAGES, json=i)
    seen: list[int] = []
    after = None
    for _ in range(10):
        params = {"limit": "2"} | ({"after": after} if after else {})
        page = (await client.get(MESSAGES, params=params)).json()
        if not page["messages"]:
            break
        seen += [m["data"] for m in page["messages"]]
        after = page["next_after"]
    assert seen == [0, 1, 2, 3, 4]


async def test_unknown_channel_polls_empty(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/channels/never-used/messages")
    assert response.status_code == 200
    assert response.json() == {"messages": [], "next_after": "0000000000000000"}


async def test_long_poll_released_by_publish(client: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(client.get(MESSAGES, params={"wait": "5"}))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await client.post(MESSAGES, json="wake")
    response = await asyncio.wait_for(waiting, 2)
    assert [m["data"] for m in response.json()["messages"]] == ["wake"]


async def test_long_poll_deadline_answers_empty(client: httpx.AsyncClient) -> None:
    await client.post(MESSAGES, json=1)
    response = await client.get(MESSAGES, params={"after": "1", "wait": "0.05"})
    assert response.json() == {"messages": [], "next_after": "0000000000000001"}


async def test_idempotent_publish(client: httpx.AsyncClient) -> None:
    headers = {"idempotency-key": "order-17"}
    first = await client.post(MESSAGES, json={"order": 17}, headers=headers)
    again = await client.post(MESSAGES, json={"order": 17}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    other = await client.post(MESSAGES, json={"order": 18}, headers=headers)
    assert_problem(other, 422, "idempotency-key-reused")
    assert len((await client.get(MESSAGES)).json()["messages"]) == 1


async def test_channel_info_and_retention(client: httpx.AsyncClient) -> None:
    for i in range(4):
        await client.post(MESSAGES, json=i)
    info = (await client.get("/v1/channels/news")).json()
    assert info == {
        "channel": "news",
        "last_id": "0000000000000004",
        "first_id": "0000000000000001",
        "retained": 4,
        "retention": {"max_count": 10000, "max_age": 86400.0},
        "subscribers": {},
    }
    changed = await client.put("/v1/channels/news", json={"retention": {"max_count": 2}})
    assert changed.status_code == 200
    assert changed.json()["retention"] == {"max_count": 2, "max_age": 86400.0}
    assert changed.json()["retained"] == 2
    aged = await client.put("/v1/channels/news", json={"retention": {"max_age": 60}})
    assert aged.json()["retention"] == {"max_count": 10000, "max_age": 60.0}
    cleared = await client.put("/v1/channels/news", json={"retention": None})
    assert cleared.json()["retention"]["max_count"] == 10000


async def test_subscribers_by_transport(client: httpx.AsyncClient) -> None:
    waiting = [asyncio.create_task(client.get(MESSAGES, params={"wait": "5"})) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert (await client.get("/v1/channels/news")).json()["subscribers"] == {"longpoll": 3}
    await client.post(MESSAGES, json=0)
    await asyncio.gather(*waiting)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "slug"),
    [
        ("GET", "/v1/channels/bad!name/messages", {}, 400, "invalid-channel"),
        ("GET", "/v1/channels/a%2Fb/messages", {}, 400, "invalid-channel"),
        ("GET", "/v1/channels/%ff/messages", {}, 400, "invalid-channel"),
        ("GET", "/v1/channels/" + "x" * 201 + "/messages", {}, 400, "invalid-channel"),
        ("GET", MESSAGES + "?after=xyz", {}, 400, "invalid-cursor"),
        ("GET", MESSAGES + "?after=" + "1" * 17, {}, 400, "invalid-cursor"),
        ("GET", MESSAGES + "?limit=0", {}, 400, "limit-out-of-range"),
        ("GET", MESSAGES + "?limit=51", {}, 400, "limit-out-of-range"),
        ("GET", MESSAGES + "?limit=ten", {}, 400, "invalid-parameter"),
        ("GET", MESSAGES + "?limit=-1", {}, 400, "invalid-parameter"),
        ("GET", MESSAGES + "?limit=1&limit=2", {}, 400, "invalid-parameter"),
        ("GET", MESSAGES + "?wait=6", {}, 400, "wait-out-of-range"),
        ("GET", MESSAGES + "?wait=-1", {}, 400, "wait-out-of-range"),
        ("GET", MESSAGES + "?wait=nan", {}, 400, "invalid-parameter"),
        ("GET", MESSAGES + "?wait=inf", {}, 400, "invalid-parameter"),
        (
            "POST",
            MESSAGES,
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
            "malformed-json",
        ),
        (
            "POST",
            MESSAGES,
            {"content": b"\xff", "headers": {"content-type": "text/plain"}},
            400,
            "invalid-text",
        ),
        (
            "POST",
            MESSAGES,
            {"content": b"x", "headers": {"content-type": "nonsense"}},
            415,
            "unsupported-media-type",
        ),
        ("POST", MESSAGES, {"content": b"x" * 1001}, 413, "message-too-large"),
        (
            "POST",
            MESSAGES,
            {"content": b"x", "headers": {"idempotency-key": "has space"}},
            400,
            "invalid-idempotency-key",
        ),
        ("PUT", "/v1/channels/news", {"content": b"[1]"}, 400, "invalid-retention"),
        ("PUT", "/v1/channels/news", {"content": b"{"}, 400, "malformed-json"),
        (
            "PUT",
            "/v1/channels/news",
            {"json": {"retention": {"max_count": 0}}},
            400,
            "invalid-retention",
        ),
        (
            "PUT",
            "/v1/channels/news",
            {"json": {"retention": {"max_count": True}}},
            400,
            "invalid-retention",
        ),
        (
            "PUT",
            "/v1/channels/news",
            {"json": {"retention": {"max_age": 0.5}}},
            400,
            "invalid-retention",
        ),
        (
            "PUT",
            "/v1/channels/news",
            {"json": {"retention": {"max_count": 2**63}}},
            400,
            "invalid-retention",
        ),
        (
            "PUT",
            "/v1/channels/news",
            {"json": {"retention": {"max_age": 1e300}}},
            400,
            "invalid-retention",
        ),
        ("PUT", "/v1/channels/news", {"json": {}}, 400, "invalid-retention"),
        ("GET", MESSAGES + "?after=8000000000000000", {}, 400, "invalid-cursor"),
        (
            "GET",
            MESSAGES + "?" + "&".join(f"p{i}=1" for i in range(51)),
            {},
            400,
            "invalid-parameter",
        ),
        (
            "PUT",
            "/v1/channels/news",
            {"json": {"retention": {"colour": 1}}},
            400,
            "invalid-retention",
        ),
        ("GET", "/nowhere", {}, 404, "not-found"),
        ("GET", "/v1/channels/news/messages/extra", {}, 404, "not-found"),
        ("DELETE", MESSAGES, {}, 405, "method-not-allowed"),
        ("GET", "/problems/nope", {}, 404, "not-found"),
    ],
)
async def test_bad_requests_get_problem_documents(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    slug: str,
) -> None:
    response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert_problem(response, status, slug)
    assert (await client.get("/v1/channels/news")).json()["last_id"] == "0000000000000000"


async def test_method_not_allowed_names_the_allowed_methods(client: httpx.AsyncClient) -> None:
    response = await client.delete(MESSAGES)
    assert response.headers["allow"] == "POST, GET, HEAD"


async def test_head_answers_like_get_without_a_body(client: httpx.AsyncClient) -> None:
    await client.post(MESSAGES, json=1)
    get = await client.get(MESSAGES)
    head = await client.head(MESSAGES)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert (await client.head("/healthz")).status_code == 200


async def test_declared_oversized_body_is_refused_before_reading(client: httpx.AsyncClient) -> None:
    async def endless() -> object:
        while True:
            yield b"x" * 100

    response = await client.post(MESSAGES, content=endless())  # type: ignore[arg-type]
    assert_problem(response, 413, "message-too-large")


async def test_too_many_long_polls_is_503_with_retry_after(client: httpx.AsyncClient) -> None:
    waiting = [asyncio.create_task(client.get(MESSAGES, params={"wait": "5"})) for _ in range(20)]
    await asyncio.sleep(0.1)
    refused = await client.get(MESSAGES, params={"wait": "5"})
    assert_problem(refused, 503, "too-busy")
    assert refused.headers["retry-after"] == "1"
    await client.post(MESSAGES, json=0)
    await asyncio.gather(*waiting)


async def test_health_readiness_and_problem_types(
    client: httpx.AsyncClient, app: BackchannelApp
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    for slug, problem in PROBLEM_TYPES.items():
        described = (await client.get(f"/problems/{slug}")).json()
        assert described["status"] == problem.status
    await app.shutdown()
    assert_problem(await client.get("/readyz"), 503, "unavailable")


async def test_openapi_document_lists_every_route(client: httpx.AsyncClient) -> None:
    from backchannel.server.routes import ROUTES

    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    for route in ROUTES:
        if route.method != "WEBSOCKET":
            assert route.method.lower() in spec["paths"][route.path]
    assert (await client.get("/docs")).json() == spec
    page = await client.get("/docs", headers={"accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html")
    assert "/v1/channels/{channel}/messages" in page.text


async def test_websocket_to_an_unknown_path_is_refused(app: BackchannelApp) -> None:
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app({"type": "websocket", "path": "/v1/nowhere", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_event_stream_from_a_foreign_origin_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/v1/channels/news/events", headers={"origin": "http://elsewhere.example"}
    )
    assert_problem(response, 403, "origin-not-allowed")
    assert (await client.get("/v1/channels/news")).json()["subscribers"] == {}
