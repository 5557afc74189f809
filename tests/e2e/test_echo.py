"""``/v1/echo`` on a real hub process: off by default, an echo with ``--ws-echo``, tokens.

Under ``backchannel serve`` text replies take the direct path (the hub's own frames written to
uvicorn's transport); tests/server/test_websocket.py covers the plain ASGI path.
"""

from __future__ import annotations

import asyncio

import pytest
import websockets

from ..jwt_keys import AUDIENCE, ISSUER, Keys
from .conftest import HubProcess

pytestmark = pytest.mark.e2e


def ws_url(hub: HubProcess, path: str) -> str:
    return "ws" + hub.url[len("http") :] + path


async def test_echo_is_refused_unless_turned_on(hub: HubProcess) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url(hub, "/v1/echo"))
    assert refused.value.response.status_code == 403  # as on any path that is no WebSocket
    with hub.client() as http:
        assert http.get("/v1/echo").status_code == 404


async def test_echo_sends_back_every_message(hub_factory: type[HubProcess]) -> None:
    hub = hub_factory("--ws-echo").start()
    async with websockets.connect(ws_url(hub, "/v1/echo"), max_size=None) as ws:
        # Lengths at the edges of a frame header's three sizes, text (in the hub's own frames)
        # and binary alike.
        for size in (0, 1, 125, 126, 127, 65_535, 65_536, 1_048_576):
            text = ("é" * size)[: size // 2] + "a" * (size - 2 * (size // 2))
            await ws.send(text)
            assert await ws.recv() == text
            data = bytes(i % 251 for i in range(size))
            await ws.send(data)
            assert await ws.recv() == data

        # Many at once, alternately text and binary, while the client reads: each comes back
        # once, in order, as what it was.
        sent: list[str | bytes] = [
            f"{n:04d}" * 25_000 if n % 2 else f"{n:04d}".encode() * 25_000 for n in range(40)
        ]

        async def send_all() -> None:
            for message in sent:
                await ws.send(message)

        sender = asyncio.create_task(send_all())
        async with asyncio.timeout(60):
            received = [await ws.recv() for _ in sent]
        await sender
        assert received == sent

    # Over the WebSocket message limit (max_message_bytes * 4/3 + 64 KiB): close 1009.
    async with websockets.connect(ws_url(hub, "/v1/echo"), max_size=None) as ws:
        await ws.send(b"x" * (1_048_576 * 4 // 3 + 65_537))
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    # Shutdown closes an echo socket with 1001, like the push sockets.
    async with websockets.connect(ws_url(hub, "/v1/echo")) as ws:
        await ws.send("still here")
        assert await ws.recv() == "still here"
        assert hub.proc is not None
        hub.proc.terminate()
        with pytest.raises(websockets.ConnectionClosedOK) as closed_ok:
            async with asyncio.timeout(30):
                await ws.recv()
    assert closed_ok.value.rcvd is not None
    assert (closed_ok.value.rcvd.code, closed_ok.value.rcvd.reason) == (
        1001,
        "the hub is shutting down",
    )
    assert hub.proc.wait(30) == 0
    assert "Traceback" not in hub.stderr()


async def test_echo_needs_a_token_when_auth_is_on(
    hub_factory: type[HubProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    keys = Keys(tmp_path_factory.mktemp("keys"))
    hub = hub_factory(
        "--ws-echo",
        "--auth-secret-file",
        str(keys.secret_file),
        "--auth-audience",
        AUDIENCE,
        "--auth-issuer",
        ISSUER,
    ).start()
    for token in (None, "not-a-jwt", keys.token(exp=1, iat=0)):
        query = f"?token={token}" if token else ""
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(ws_url(hub, "/v1/echo" + query))
        assert refused.value.response.status_code == 401
    no_grants = keys.token(bc=None)  # any valid token will do, whatever it grants
    for url, headers in (
        (ws_url(hub, f"/v1/echo?token={no_grants}"), {}),
        (ws_url(hub, "/v1/echo"), {"Authorization": f"Bearer {no_grants}"}),
    ):
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
