"""The WebSocket endpoints in process, through Starlette's test client (the plain ASGI path)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from backchannel import Settings, create_app
from backchannel.store import MemoryStore


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = Settings(max_subscriptions=2, allowed_origins="https://app.example")
    app = create_app(settings, store=MemoryStore())
    with TestClient(app) as test_client:
        yield test_client


def test_mux_round_trip(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_json({"op": "subscribe", "id": 1, "channel": "news"})
        assert ws.receive_json() == {"op": "ok", "id": 1}
        ws.send_json({"op": "publish", "id": "p1", "channel": "news", "data": {"n": 1}})
        replies = [ws.receive_json(), ws.receive_json()]
        published = next(r for r in replies if r["op"] == "published")
        pushed = next(r for r in replies if r["op"] == "message")
        assert published["id"] == "p1" and published["message_id"] == "0000000000000001"
        assert pushed["message"]["data"] == {"n": 1}
        ws.send_json({"op": "ping", "id": 2})
        assert ws.receive_json() == {"op": "pong", "id": 2}
        ws.send_json({"op": "unsubscribe", "id": 3, "channel": "news"})
        assert ws.receive_json() == {"op": "ok", "id": 3}


@pytest.mark.parametrize(
    ("command", "slug"),
    [
        ({"op": "subscribe", "id": 1, "channel": "bad name"}, "invalid-channel"),
        ({"op": "subscribe", "id": 1, "channel": "c", "after": "xyz"}, "invalid-cursor"),
        ({"op": "subscribe", "id": 1, "channel": 5}, "invalid-command"),
        ({"op": "unsubscribe", "id": 1, "channel": "never"}, "not-subscribed"),
        ({"op": "dance", "id": 1}, "invalid-command"),
        ({"op": "publish", "id": 1, "channel": "c"}, "invalid-command"),
        (
            {"op": "publish", "id": 1, "channel": "c", "encoding": "base64", "data": "!!"},
            "invalid-command",
        ),
        (
            {"op": "publish", "id": 1, "channel": "c", "encoding": "text", "data": 5},
            "invalid-command",
        ),
        (
            {"op": "publish", "id": 1, "channel": "c", "data": 1, "content_type": "x"},
            "unsupported-media-type",
        ),
        (
            {"op": "publish", "id": 1, "channel": "c", "data": 1, "idempotency_key": 7},
            "invalid-idempotency-key",
        ),
    ],
)
def test_refused_commands_get_errors_and_the_connection_stays(
    client: TestClient, command: dict[str, object], slug: str
) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_json(command)
        error = ws.receive_json()
        assert (error["op"], error["id"], error["type"]) == ("error", 1, f"/problems/{slug}")
        ws.send_json({"op": "ping", "id": 9})
        assert ws.receive_json() == {"op": "pong", "id": 9}


def test_connection_level_errors_have_no_id(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text("not json")
        assert ws.receive_json()["type"] == "/problems/malformed-json"
        ws.send_json([1, 2])
        assert ws.receive_json()["id"] is None
        ws.send_json({"op": "ping"})
        assert ws.receive_json()["type"] == "/problems/invalid-command"


def test_subscription_limits(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        for i, channel in enumerate(["a", "b"]):
            ws.send_json({"op": "subscribe", "id": i, "channel": channel})
            assert ws.receive_json()["op"] == "ok"
        ws.send_json({"op": "subscribe", "id": 5, "channel": "a"})
        assert ws.receive_json()["type"] == "/problems/already-subscribed"
        ws.send_json({"op": "subscribe", "id": 6, "channel": "c"})
        assert ws.receive_json()["type"] == "/problems/too-many-subscriptions"


def test_text_and_base64_publishes(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_json({"op": "publish", "id": 1, "channel": "c", "encoding": "text", "data": "hé"})
        assert ws.receive_json()["op"] == "published"
        raw = base64.b64encode(b"\x00\xff").decode()
        ws.send_json({"op": "publish", "id": 2, "channel": "c", "encoding": "base64", "data": raw})
        assert ws.receive_json()["op"] == "published"
    messages = client.get("/v1/channels/c/messages").json()["messages"]
    assert [(m["encoding"], m["data"]) for m in messages] == [("text", "hé"), ("base64", raw)]


def test_one_channel_socket_replays_from_a_cursor(client: TestClient) -> None:
    for n in range(3):
        client.post("/v1/channels/c/messages", json=n)
    with client.websocket_connect("/v1/channels/c/ws?after=1") as ws:
        assert [ws.receive_json()["data"] for _ in range(2)] == [1, 2]


@pytest.mark.parametrize("path", ["/v1/channels/bad%20name/ws", "/v1/channels/c/ws?after=zz"])
def test_one_channel_socket_closes_4000_on_bad_requests(client: TestClient, path: str) -> None:
    with client.websocket_connect(path) as ws, pytest.raises(WebSocketDisconnect) as info:
        ws.receive_text()
    assert info.value.code == 4000


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example", True),
        ("http://testserver", True),  # same origin as the Host header
        ("https://evil.example", False),
    ],
)
def test_origin_check(client: TestClient, origin: str, allowed: bool) -> None:
    if allowed:
        with client.websocket_connect("/v1/ws", headers={"origin": origin}) as ws:
            ws.send_json({"op": "ping", "id": 1})
            assert ws.receive_json()["op"] == "pong"
    else:
        with (
            pytest.raises(WebSocketDisconnect) as info,
            client.websocket_connect("/v1/ws", headers={"origin": origin}),
        ):
            pass
        assert info.value.code == 1008


# -- /v1/echo (only with ws_echo) ----------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[TestClient]:
    app = create_app(Settings(ws_echo=True, max_message_bytes=1), store=MemoryStore())
    with TestClient(app) as test_client:
        yield test_client


def test_echo_is_off_by_default(client: TestClient) -> None:
    # Refused before the handshake, as on any path that is not a WebSocket route.
    for path in ("/v1/echo", "/v1/nowhere"):
        with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect(path):
            pass
        assert info.value.code == 1008
    assert client.get("/v1/echo").status_code == 404


def test_echo_sends_every_message_back_as_it_came(echo: TestClient) -> None:
    with echo.websocket_connect("/v1/echo") as ws:
        for text in ("hello", "", "hé ☃ 𝄞", "x" * 65_000):
            ws.send_text(text)
            assert ws.receive_text() == text  # a text frame, not a binary one
        for data in (b"\x00\xff", b"", bytes(range(256)) * 100):
            ws.send_bytes(data)
            assert ws.receive_bytes() == data
        # Sent back to back, they come back in order.
        ws.send_text("1")
        ws.send_bytes(b"2")
        ws.send_text("3")
        assert (ws.receive_text(), ws.receive_bytes(), ws.receive_text()) == ("1", b"2", "3")
    assert echo.get("/v1/echo").status_code == 405  # a WebSocket route now


@pytest.mark.parametrize("oversized", ["x" * 65_538, b"x" * 65_538])
def test_echo_closes_1009_past_the_websocket_message_limit(
    echo: TestClient, oversized: str | bytes
) -> None:
    # max_message_bytes=1: the limit is 1 * 4 // 3 + 65 536 = 65 537 bytes (Settings.ws_max_size).
    assert echo.app.settings.ws_max_size == 65_537  # type: ignore[attr-defined]
    with echo.websocket_connect("/v1/echo") as ws:
        ws.send_bytes(b"y" * 65_537)
        assert ws.receive_bytes() == b"y" * 65_537
        if isinstance(oversized, str):
            ws.send_text(oversized)
        else:
            ws.send_bytes(oversized)
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_bytes()
    assert info.value.code == 1009
    assert info.value.reason == "Message exceeds the maximum size (65537 bytes)"


async def test_echo_reads_nothing_more_while_a_reply_waits() -> None:
    """Flow control: while the reply to one message cannot be sent, the endpoint does not ask
    for the next one (so a client that sends without reading makes the ASGI server stop
    reading, instead of making the hub buffer)."""
    app = create_app(Settings(ws_echo=True), store=MemoryStore())
    await app.startup()
    inbox: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    for message in (
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "one"},
        {"type": "websocket.receive", "bytes": b"two"},
        {"type": "websocket.receive", "text": "three"},
    ):
        inbox.put_nowait(message)
    received = 0
    sent: list[dict[str, object]] = []
    writable = asyncio.Event()

    async def receive() -> dict[str, object]:
        nonlocal received
        received += 1
        return await inbox.get()

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "websocket.send":
            await writable.wait()  # a client that does not read
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/echo", "headers": [], "query_string": b""}
    task = asyncio.create_task(app(scope, receive, send))
    for _ in range(50):
        await asyncio.sleep(0)
    assert sent == [{"type": "websocket.accept"}]
    assert received == 2  # the connect and the first message; the other two are not taken
    writable.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert received == 5 and inbox.empty()
    assert sent[1:] == [
        {"type": "websocket.send", "text": "one"},
        {"type": "websocket.send", "bytes": b"two"},
        {"type": "websocket.send", "text": "three"},
    ]
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(task, 10)
    await app.shutdown()
