"""One behaviour suite for every push transport, against a real hub process."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from backchannel.wire import frames as f
from backchannel.wire.sse import EventParser

from .conftest import HubProcess, on_every_store
from .push_clients import CLIENTS, PushClient, SSEClient

pytestmark = pytest.mark.e2e
TRANSPORTS = sorted(CLIENTS)
# A subscriber on the multiplexed WebSocket counts as "ws".
COUNTED_AS = {"sse": "sse", "ws": "ws", "mux": "ws", "tcp": "tcp"}


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client_for(transport: str, hub: HubProcess) -> PushClient:
    return CLIENTS[transport](hub.url, hub.tcp_port)


async def publish(http: httpx.AsyncClient, channel: str, texts: list[str]) -> list[str]:
    ids = []
    for text in texts:
        response = await http.post(
            f"/v1/channels/{channel}/messages",
            content=text.encode(),
            headers={"content-type": "text/plain"},
        )
        assert response.status_code == 201
        ids.append(response.json()["id"])
    return ids


async def wait_for_subscribers(
    http: httpx.AsyncClient, channel: str, transport: str, count: int
) -> None:
    for _ in range(500):
        info = (await http.get(f"/v1/channels/{channel}")).json()
        if info["subscribers"].get(COUNTED_AS[transport], 0) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} {transport} subscribers never showed: {info}")


@on_every_store
async def test_live_messages_arrive_in_order(hub: HubProcess, transport: str) -> None:
    client = client_for(transport, hub)
    async with httpx.AsyncClient(base_url=hub.url) as http:
        await publish(http, "news", ["before"])  # history: not sent without a cursor
        await client.connect("news")
        await wait_for_subscribers(http, "news", transport, 1)
        ids = await publish(http, "news", [f"m{i}" for i in range(30)])
        received = await client.take(30)
        await client.close()
    assert received == [(i, f"m{n}") for n, i in enumerate(ids)]


@on_every_store
async def test_resume_after_disconnect_loses_and_repeats_nothing(
    hub: HubProcess, transport: str
) -> None:
    async with httpx.AsyncClient(base_url=hub.url) as http:
        history = await publish(http, "news", [f"h{i}" for i in range(10)])
        first = client_for(transport, hub)
        await first.connect("news", after="0")
        seen = await first.take(10)
        live = await publish(http, "news", [f"l{i}" for i in range(5)])
        seen += await first.take(5)
        await first.close()
        missed = await publish(http, "news", [f"x{i}" for i in range(7)])
        second = client_for(transport, hub)
        await second.connect("news", after=seen[-1][0])
        more = await publish(http, "news", ["after reconnect"])
        seen += await second.take(8)
        await second.close()
    assert [i for i, _ in seen] == history + live + missed + more
    assert seen[-1][1] == "after reconnect"


@on_every_store
async def test_replay_and_live_join_without_gap_while_publishing(
    hub: HubProcess, transport: str
) -> None:
    total = 400
    async with httpx.AsyncClient(base_url=hub.url) as http:

        async def publisher(worker: int) -> None:
            await publish(http, "race", [f"{worker}-{i}" for i in range(total // 4)])

        publishers = [asyncio.create_task(publisher(w)) for w in range(4)]
        while (await http.get("/v1/channels/race")).json()["last_id"] < "0000000000000032":
            await asyncio.sleep(0.005)
        client = client_for(transport, hub)
        await client.connect("race", after="0")  # replay races the publishers
        await asyncio.gather(*publishers)
        received = await client.take(total)
        await client.close()
    assert [i for i, _ in received] == [f"{n:016x}" for n in range(1, total + 1)]


def _stalled_socket(hub: HubProcess, transport: str) -> socket.socket:
    """A subscriber that asks for messages and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if transport == "tcp":
        sock.connect(("127.0.0.1", hub.tcp_port))
        codec = f.Connection(f.Role.CLIENT)
        sock.sendall(codec.send(f.Hello(versions=(1,))))
        sock.sendall(f.encode(f.Subscribe(request=1, channel="flood", after=None)))
        return sock
    port = int(hub.url.rsplit(":", 1)[1])
    sock.connect(("127.0.0.1", port))
    if transport == "sse":
        sock.sendall(b"GET /v1/channels/flood/events HTTP/1.1\r\nHost: x\r\n\r\n")
    else:
        path = b"/v1/ws" if transport == "mux" else b"/v1/channels/flood/ws"
        sock.sendall(
            b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        if transport == "mux":
            time.sleep(0.2)
            command = json.dumps({"op": "subscribe", "id": 1, "channel": "flood"}).encode()
            mask = b"\x00\x00\x00\x00"
            sock.sendall(bytes([0x81, 0x80 | len(command)]) + mask + command)
    return sock


async def test_slow_consumer_is_cut_off_and_others_keep_up(
    hub_factory: type[HubProcess], transport: str
) -> None:
    hub = hub_factory("--max-outbound-bytes", "65536", "--store", "memory://").start()
    count, size = 200, 32 * 1024  # 6.4 MB: more than the kernel's socket buffers absorb
    async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
        stalled = _stalled_socket(hub, transport)
        fast = client_for(transport, hub)
        await fast.connect("flood")
        await wait_for_subscribers(http, "flood", transport, 2)
        consumer = asyncio.create_task(fast.take(count, timeout=60))
        body = "x" * size
        for i in range(count):
            await publish(http, "flood", [f"{i:04d}{body}"])
        received = await consumer
        await wait_for_subscribers(http, "flood", transport, 1)  # the stalled one is gone
        await fast.close()
        stalled.close()
    assert [text[:4] for _, text in received] == [f"{i:04d}" for i in range(count)]


async def test_a_client_that_leaves_is_unsubscribed(hub: HubProcess, transport: str) -> None:
    # SSE streams under uvicorn leave uvicorn's hands once started (server/fastpath.py
    # take_over): only the connection's own end tells the hub the subscriber is gone.
    async with httpx.AsyncClient(base_url=hub.url) as http:
        leaving, staying = client_for(transport, hub), client_for(transport, hub)
        await leaving.connect("coming-and-going")
        await staying.connect("coming-and-going")
        await wait_for_subscribers(http, "coming-and-going", transport, 2)
        await leaving.close()
        await wait_for_subscribers(http, "coming-and-going", transport, 1)
        ids = await publish(http, "coming-and-going", ["after"])
        assert await staying.take(1) == [(ids[0], "after")]
        await staying.close()
        await wait_for_subscribers(http, "coming-and-going", transport, 0)


async def test_a_request_pipelined_behind_a_stream_is_not_answered(hub: HubProcess) -> None:
    # An event stream never ends on its own, so nothing behind it on the connection can be
    # answered; the stream itself must still work (it stays with uvicorn, not taken over).
    request = (
        b"GET /v1/channels/piped/events HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    host, port = hub.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    async with httpx.AsyncClient(base_url=hub.url) as http:
        await wait_for_subscribers(http, "piped", "sse", 1)
        ids = await publish(http, "piped", ["through"])
    data = b""
    while f"id: {ids[0]}".encode() not in data:
        data += await asyncio.wait_for(reader.read(4096), 10)
    assert b"HTTP/1.1" not in data  # no answer to the pipelined request
    writer.close()


async def test_shutdown_ends_every_stream(hub: HubProcess) -> None:
    clients = [client_for(t, hub) for t in TRANSPORTS]
    async with httpx.AsyncClient(base_url=hub.url) as http:
        for client in clients:
            await client.connect("news")
        for t in ("sse", "tcp"):
            await wait_for_subscribers(http, "news", t, 1)
        await wait_for_subscribers(http, "news", "ws", 2)
        await publish(http, "news", ["last"])
        readers = [asyncio.create_task(c.take(2, timeout=30)) for c in clients]
        await asyncio.sleep(0.2)
        began = time.monotonic()
        hub.proc.terminate()  # type: ignore[union-attr]
        results = await asyncio.gather(*readers)
        ended_after = time.monotonic() - began
    assert all(r == results[0] and len(r) == 1 for r in results)
    by_transport = {c.transport: c.ended for c in clients}
    assert by_transport == {
        "sse": "stream ended",
        "ws": "close 1001",
        "mux": "close 1001",
        "tcp": "shutting-down",
    }
    sse = next(c for c in clients if isinstance(c, SSEClient))
    assert sse.retries == 2  # one when the stream opened, one telling the browser to come back
    assert hub.proc.wait(15) == 0  # type: ignore[union-attr]
    assert ended_after < 15  # a hang guard; docs/benchmarks.md reports the real time


async def test_streams_ended_by_a_shutdown_come_back_at_different_times(
    hub_factory: type[HubProcess],
) -> None:
    """Each stream's last ``retry:`` is between --sse-retry and twice that, and not the same
    for all: a restarted hub does not get every browser back in the same millisecond."""
    hub = hub_factory("--sse-retry", "1", "--store", "memory://").start()
    host, port = urlsplit(hub.url).hostname, urlsplit(hub.url).port
    request = f"GET /v1/channels/news/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    streams = []
    for _ in range(12):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        streams.append((reader, writer))
    async with httpx.AsyncClient(base_url=hub.url) as http:
        await wait_for_subscribers(http, "news", "sse", len(streams))
    hub.proc.terminate()  # type: ignore[union-attr]
    last_retries = []
    for reader, writer in streams:
        body = await asyncio.wait_for(reader.read(), 15)  # until the hub closes
        writer.close()
        values = [int(v) for v in re.findall(rb"retry: (\d+)", body)]
        assert values[0] == 1000  # the stream's first, as configured
        last_retries.append(values[-1])
    assert all(1000 <= v <= 2000 for v in last_retries), last_retries
    assert len(set(last_retries)) > 1, last_retries
    assert hub.proc.wait(15) == 0  # type: ignore[union-attr]


async def test_sse_headers_heartbeat_and_multi_channel_resume(
    hub_factory: type[HubProcess],
) -> None:
    hub = hub_factory("--sse-heartbeat", "0.3", "--store", "memory://").start()
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
        await publish(http, "a", ["a1"])
        async with http.stream("GET", "/v1/events?channel=a&channel=b") as stream:
            assert stream.headers["cache-control"] == "no-cache"
            assert stream.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in stream.headers
            parser = EventParser()
            chunks = stream.aiter_raw()
            seen = b""
            while b": heartbeat" not in seen:  # sent once the stream is idle
                seen += await anext(chunks)
            await wait_for_subscribers(http, "b", "sse", 1)
            await publish(http, "a", ["a2"])
            await publish(http, "b", ["b1"])
            events = []
            while len(events) < 2:
                parser.receive_data(await anext(chunks))
                events += parser.events()
        # Each id names every channel's position, so one Last-Event-ID resumes both.
        assert [e.id for e in events] == ["a=2,b=0", "a=2,b=1"]
        await publish(http, "a", ["a3"])
        await publish(http, "b", ["b2"])
        async with http.stream(
            "GET", "/v1/events?channel=a&channel=b", headers={"last-event-id": events[-1].id}
        ) as stream:
            parser = EventParser()
            resumed: list[str] = []
            async for chunk in stream.aiter_raw():
                parser.receive_data(chunk)
                resumed += [json.loads(e.data)["data"] for e in parser.events()]
                if len(resumed) == 2:
                    break
    assert sorted(resumed) == ["a3", "b2"]


async def test_tcp_protocol_errors_close_with_an_error_frame(hub: HubProcess) -> None:
    async def exchange(data: bytes) -> list[f.Event]:
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.tcp_port)
        writer.write(data)
        codec = f.Connection(f.Role.CLIENT)
        codec._enter(f.State.OPEN)  # read whatever the server says, handshake or not
        events: list[f.Event] = []
        async with asyncio.timeout(10):
            while True:
                chunk = await reader.read(65536)
                codec.receive_data(chunk)
                while (event := codec.next_event()) not in (f.NEED_DATA, f.CONNECTION_CLOSED):
                    events.append(event)
                if not chunk or codec.state is f.State.CLOSED:
                    break
        writer.close()
        return events

    no_version = await exchange(b"\x00\x00\x00\x07\x01BKCH\x01\x09")
    assert [(e.request, e.type) for e in no_version if isinstance(e, f.Error)] == [
        (0, "unsupported-version")
    ]
    garbage = await exchange(b"\x00\x00\x00\x02\x77\x00")
    assert [(e.request, e.type) for e in garbage if isinstance(e, f.Error)] == [
        (0, "protocol-error")
    ]
    huge = await exchange(b"\x7f\xff\xff\xff\x01")
    assert [(e.request, e.type) for e in huge if isinstance(e, f.Error)] == [(0, "frame-too-large")]


async def test_a_long_replay_waits_for_the_reader_instead_of_cutting_it(
    hub_factory: type[HubProcess], transport: str
) -> None:
    # 4 MB of history against a 256 KiB outbound limit: the replay must pace itself.
    hub = hub_factory("--max-outbound-bytes", "262144", "--store", "memory://").start()
    async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
        body = "y" * 4000
        for i in range(1000):
            await publish(http, "history", [f"{i:04d}{body}"])
        client = client_for(transport, hub)
        await client.connect("history", after="0")
        received = await client.take(1000, timeout=60)
        await client.close()
    assert [text[:4] for _, text in received] == [f"{i:04d}" for i in range(1000)]
