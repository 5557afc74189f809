"""The SDK against a real hub: every way to subscribe, resume across kill -9, pooling."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backchannel.client import (
    VIAS,
    AsyncClient,
    CircuitBreaker,
    Client,
    HubError,
    Message,
    Resilience,
    RetryPolicy,
)

from .conftest import HubProcess

pytestmark = pytest.mark.e2e
FAST_RETRY = RetryPolicy(attempts=4, base=0.05, cap=0.5)


def fast_breaker() -> CircuitBreaker:
    """A breaker that probes again soon, so that tests of a restarting hub stay short."""
    return CircuitBreaker(threshold=5, reset_after=0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_for(hub: HubProcess) -> Client:
    return Client(hub.url, tcp_port=hub.tcp_port, retry=FAST_RETRY)


@pytest.mark.parametrize("via", VIAS)
def test_every_via_receives_the_same_messages_in_order(hub: HubProcess, via: str) -> None:
    with client_for(hub) as client:
        history = [client.publish("news", {"n": i}).id for i in range(5)]
        received: list[Message] = []
        with client.subscribe("news", via=via, after="0", wait=5, interval=0.05) as subscription:
            for message in subscription:
                received.append(message)
                if len(received) == 5:
                    live = [client.publish("news", {"n": i}).id for i in range(5, 10)]
                if len(received) == 10:
                    break
        expected = client.poll("news").messages
    assert [m.id for m in received] == history + live
    assert received == expected


def test_text_and_bytes_arrive_as_published(hub: HubProcess) -> None:
    with client_for(hub) as client:
        client.publish("mixed", content="héllo")
        client.publish("mixed", content=b"\x00\xff")
        for via in ("sse", "tcp"):
            with client.subscribe("mixed", via=via, after="0") as subscription:
                first, second = next(subscription), next(subscription)
            assert (first.encoding, first.data) == ("text", "héllo")
            assert (second.encoding, second.data) == ("base64", b"\x00\xff")


@pytest.mark.parametrize("via", VIAS)
def test_subscription_survives_kill_9_and_restart(hub_factory: type[HubProcess], via: str) -> None:
    port, tcp_port = free_port(), free_port()
    hub = hub_factory("--port", str(port), "--tcp-port", str(tcp_port)).start()
    received: list[str] = []
    failure: list[BaseException] = []
    client = Client(hub.url, tcp_port=hub.tcp_port, retry=FAST_RETRY, breaker=fast_breaker())
    subscription = client.subscribe("news", via=via, after="0", wait=2, interval=0.05)

    def consume() -> None:
        try:
            for message in subscription:
                received.append(message.data["n"])
                if len(received) == 20:
                    return
        except BaseException as exc:  # reported to the test below
            failure.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    with Client(hub.url) as publisher:
        for i in range(10):
            publisher.publish("news", {"n": i})
    deadline = time.monotonic() + 20
    while len(received) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    hub.kill()
    hub.start()
    with Client(hub.url, retry=FAST_RETRY, resilience=Resilience(breaker=None)) as publisher:
        for i in range(10, 20):
            publisher.publish("news", {"n": i})
    consumer.join(30)
    subscription.close()
    client.close()
    assert not failure, failure
    assert received == list(range(20))


async def test_async_twin_subscribes_and_publishes(hub: HubProcess) -> None:
    async with AsyncClient(hub.url, tcp_port=hub.tcp_port, retry=FAST_RETRY) as client:
        published = await client.publish_many("a", [{"n": i} for i in range(20)], concurrency=8)
        assert len({p.id for p in published}) == 20
        for via in VIAS:
            got = []
            async with client.subscribe("a", via=via, after="0", wait=2, interval=0.05) as sub:
                async for message in sub:
                    got.append(message.id)
                    if len(got) == 20:
                        break
            assert got == [f"{n:016x}" for n in range(1, 21)], via
        page = await client.poll("a", after=max(p.id for p in published), wait=0.1)
        assert page.messages == []
        assert (await client.info("a"))["retained"] == 20


def test_refusals_are_raised_not_retried(hub: HubProcess) -> None:
    with client_for(hub) as client:
        with pytest.raises(HubError) as info:
            client.publish("bad name", {"x": 1})
        assert info.value.status == 400 and info.value.slug == "invalid-channel"
        for via in VIAS:
            with pytest.raises(HubError) as info:
                next(client.subscribe("bad name", via=via, after="0"))
            assert info.value.status == 400, via
        with pytest.raises(ValueError):  # checked before anything is sent
            next(client.subscribe("c", after="zz"))


def _sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def test_calls_reuse_pooled_connections(hub: HubProcess) -> None:
    assert hub.proc is not None
    before = _sockets(hub.proc.pid)
    with client_for(hub) as client:
        for i in range(50):
            client.publish("pool", {"n": i})
            client.poll("pool", after="0", limit=1)
        during = _sockets(hub.proc.pid)
    # 100 calls over one kept-alive connection: the hub holds one more socket, not 100.
    assert during - before == 1


def test_cli_subscribe_prints_json_lines_and_stops_on_ctrl_c(hub: HubProcess) -> None:
    with client_for(hub) as client:
        for i in range(3):
            client.publish("cli", {"n": i})
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backchannel",
            "subscribe",
            "cli",
            "--via",
            "longpoll",
            "--after",
            "0",
            "--url",
            hub.url,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines = [json.loads(process.stdout.readline()) for _ in range(3)]
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 0
    assert [line["data"] for line in lines] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert lines[0]["id"] == "0000000000000001"


def test_async_client_is_importable_next_to_asyncio() -> None:
    assert asyncio.iscoroutinefunction(AsyncClient.publish)


@pytest.mark.parametrize("via", ["sse", "ws", "tcp", "longpoll"])
async def test_async_subscription_survives_kill_9_and_restart(
    hub_factory: type[HubProcess], via: str
) -> None:
    port, tcp_port = free_port(), free_port()
    hub = hub_factory("--port", str(port), "--tcp-port", str(tcp_port)).start()
    async with AsyncClient(
        hub.url, tcp_port=tcp_port, retry=FAST_RETRY, breaker=fast_breaker()
    ) as client:
        subscription = client.subscribe("news", via=via, after="0", wait=2, interval=0.05)
        received: list[int] = []

        async def consume() -> None:
            async for message in subscription:
                received.append(message.data["n"])
                if len(received) == 20:
                    return

        consumer = asyncio.create_task(consume())
        for i in range(10):
            await client.publish("news", {"n": i})
        while len(received) < 10:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(hub.kill)
        await asyncio.to_thread(hub.start)
        async with AsyncClient(hub.url, resilience=Resilience(breaker=None)) as publisher:
            for i in range(10, 20):
                await publisher.publish("news", {"n": i})
        await asyncio.wait_for(consumer, 30)
        await subscription.aclose()
    assert received == list(range(20))


def test_quiet_tcp_subscription_stays_connected(
    hub: HubProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backchannel.client.sync as sync_client

    monkeypatch.setattr(sync_client, "IDLE_PING", 0.2)  # ping after 0.2 s of silence
    with client_for(hub) as client, client.subscribe("quiet", via="tcp") as subscription:
        got: list[Message] = []
        reader = threading.Thread(target=lambda: got.append(next(subscription)))
        reader.start()
        time.sleep(1.5)  # several idle periods: pinged, answered, still the same connection
        client.publish("quiet", {"n": 1})
        reader.join(10)
        assert [m.data for m in got] == [{"n": 1}]
        assert subscription.resume.reconnects == 0


def test_websocket_refusals_name_their_problem_type(hub: HubProcess) -> None:
    with client_for(hub) as client, pytest.raises(HubError) as info:
        next(client.subscribe("bad name", via="ws", after="0"))
    assert info.value.slug == "invalid-channel"
