"""Crash: ``kill -9`` the hub again and again while publishers and subscribers of every
transport run, and check what docs/reliability.md promises.

One hub process (SQLite store) on fixed ports, so that clients find it again after each
restart. On one channel:

- three publishers, each with one publish in flight at a time and an idempotency key per
  message, which it sends again, with the same key, until it is acknowledged: HTTP through
  ``AsyncClient.publish``, ``publish`` commands on ``/v1/ws``, and ``PUBLISH`` frames on TCP;
- nine resuming subscribers: ``AsyncClient.subscribe`` over ``sse``, ``ws``, ``tcp``,
  ``longpoll`` and ``poll``, and raw clients (``tests/e2e/push_clients.py``) over SSE, the
  one-channel WebSocket, ``/v1/ws`` and TCP that reconnect from the last id they received and
  count every message at or before it (a duplicate) before dropping it.

Each round waits until every publisher and subscriber has made progress since the last
restart, notes the acknowledged publishes, kills the hub with SIGKILL, starts it again on the
same data, and reads the channel back: every acknowledged publish is there once, with the id
its acknowledgement gave, in the order its publisher sent it. At the end every subscriber has
received every stored message exactly once, in order, and none received a duplicate: the hub
resumes from a cursor with no repeat (docs/sse.md, docs/websocket.md, docs/tcp.md), and the
client's cursor filter (``resume.duplicates``) had nothing to drop.

``pytest tests/reliability/test_crash.py --crash-rounds 50 -s`` runs more rounds and prints
the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from backchannel.client import (
    AsyncClient,
    AsyncSubscription,
    HubError,
    HubUnreachable,
    Resilience,
    RetryPolicy,
)
from backchannel.wire import format_id
from backchannel.wire import frames as f

from ..e2e.push_clients import CLIENTS
from .conftest import HubProcess

pytestmark = pytest.mark.e2e

CHANNEL = "crash"
SDK_VIAS = ("sse", "ws", "tcp", "longpoll", "poll")
RAW_TRANSPORTS = ("sse", "ws", "mux", "tcp")
#: Acknowledged publishes per publisher, and messages per subscriber, between two kills.
PROGRESS = 10
#: Guards against a hang; never a measure of speed.
HANG_GUARD = 180.0
RECONNECT_PAUSE = 0.05
QUICK = Resilience(retry=RetryPolicy(attempts=3, base=0.05, cap=0.5), breaker=None)


# -- the hub on fixed ports ---------------------------------------------------------------------


def free_port_below_ephemeral(taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range, so that no client's own connection can
    be given it while the hub is down (which would keep the hub from listening again)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below the ephemeral range")


def start(hub: HubProcess) -> None:
    """Start (or restart) the hub; a port taken meanwhile by something else is retried."""
    for attempt in range(5):
        try:
            hub.start()
            return
        except RuntimeError:
            if attempt == 4:
                raise


# -- publishers ---------------------------------------------------------------------------------


@dataclass
class Publisher:
    name: str
    acked: list[tuple[int, str]] = field(default_factory=list)  # (n, id) in ack order
    attempts_failed: int = 0
    replayed: int = 0  # acknowledgements that found the message already stored

    def data(self, n: int) -> dict[str, Any]:
        return {"p": self.name, "n": n}

    def key(self, n: int) -> str:
        return f"{self.name}-{n}"


async def publish_http(url: str, pub: Publisher, stop: asyncio.Event, gate: asyncio.Event) -> None:
    # No retries inside publish(): every attempt waits for the gate below.
    async with AsyncClient(url, retry=RetryPolicy(attempts=1), resilience=QUICK) as client:
        n = 0
        while not stop.is_set():
            await gate.wait()
            try:
                published = await client.publish(CHANNEL, pub.data(n), idempotency_key=pub.key(n))
            except HubUnreachable:
                pub.attempts_failed += 1
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            except HubError as error:
                if error.status < 500:
                    raise
                pub.attempts_failed += 1
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            pub.replayed += published.replayed
            pub.acked.append((n, published.id))
            n += 1


async def publish_mux(
    ws_url: str, pub: Publisher, stop: asyncio.Event, gate: asyncio.Event
) -> None:
    n = 0
    connection: websockets.ClientConnection | None = None
    try:
        while not stop.is_set():
            await gate.wait()
            command = {
                "op": "publish",
                "id": n,
                "channel": CHANNEL,
                "data": pub.data(n),
                "idempotency_key": pub.key(n),
            }
            try:
                if connection is None:
                    connection = await websockets.connect(f"{ws_url}/v1/ws", open_timeout=10)
                await connection.send(json.dumps(command))
                async with asyncio.timeout(HANG_GUARD):
                    reply = json.loads(await connection.recv())
            except (OSError, websockets.WebSocketException):
                pub.attempts_failed += 1
                if connection is not None:
                    await connection.close()
                connection = None
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            if reply.get("op") == "error" and reply.get("type") == "/problems/unavailable":
                pub.attempts_failed += 1  # the hub is stopping or starting
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            assert reply["op"] == "published" and reply["id"] == n, reply
            pub.acked.append((n, reply["message_id"]))
            n += 1
    finally:
        if connection is not None:
            await connection.close()


async def publish_tcp(port: int, pub: Publisher, stop: asyncio.Event, gate: asyncio.Event) -> None:
    n = 0
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    codec = f.Connection(f.Role.CLIENT)

    async def next_event() -> f.Event:
        assert reader is not None
        while (event := codec.next_event()) is f.NEED_DATA:
            codec.receive_data(await reader.read(65536))
        return event

    try:
        while not stop.is_set():
            await gate.wait()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    codec = f.Connection(f.Role.CLIENT)
                    writer.write(codec.send(f.Hello(versions=(1,))))
                    welcome = await next_event()
                    if not isinstance(welcome, f.Welcome):  # the hub died meanwhile
                        raise ConnectionError(f"no WELCOME but {welcome}")
                frame = f.Publish(
                    request=n + 1,
                    channel=CHANNEL,
                    content_type="application/json",
                    idempotency_key=pub.key(n),
                    data=json.dumps(pub.data(n)).encode(),
                )
                writer.write(codec.send(frame))
                async with asyncio.timeout(HANG_GUARD):
                    event = await next_event()
            except (OSError, f.ProtocolError):
                pub.attempts_failed += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            if event is f.CONNECTION_CLOSED or (
                isinstance(event, f.Error) and event.type in ("shutting-down", "unavailable")
            ):
                pub.attempts_failed += 1
                writer.close()
                writer = None
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            assert isinstance(event, f.Published) and event.request == n + 1, event
            pub.acked.append((n, format_id(event.seq)))
            n += 1
    finally:
        if writer is not None:
            writer.close()


# -- subscribers --------------------------------------------------------------------------------


@dataclass
class Subscriber:
    name: str
    ids: list[str] = field(default_factory=list)  # after de-duplication, in arrival order
    duplicates: int = 0
    connections: int = 0  # raw clients: connections made
    retries: int = 0  # SDK subscriptions: reconnection attempts, failed ones included
    errors: list[str] = field(default_factory=list)
    subscription: AsyncSubscription | None = None

    @property
    def last(self) -> str:
        return self.ids[-1] if self.ids else format_id(0)

    def error(self, exc: BaseException) -> None:
        self.errors = [*self.errors[-4:], repr(exc)[:300]]


async def subscribe_sdk(client: AsyncClient, via: str, sub: Subscriber) -> None:
    subscription = client.subscribe(CHANNEL, via=via, after="0", wait=5, interval=0.05)
    sub.subscription = subscription
    async with subscription:
        async for message in subscription:
            sub.ids.append(message.id)


async def subscribe_raw(url: str, tcp_port: int, transport: str, sub: Subscriber) -> None:
    """Reconnect from the last id received, however the connection ended; count repeats."""
    cursor = 0
    while True:
        client = CLIENTS[transport](url, tcp_port)
        try:
            await client.connect(CHANNEL, after=format_id(cursor))
            sub.connections += 1
            async for message_id, _ in client.messages():
                seq = int(message_id, 16)
                if seq <= cursor:
                    sub.duplicates += 1
                    continue
                sub.ids.append(message_id)
                cursor = seq
        except Exception as exc:  # the hub is down, starting, or went away mid-handshake
            sub.error(exc)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        await asyncio.sleep(RECONNECT_PAUSE)


# -- checks -------------------------------------------------------------------------------------


async def read_channel(url: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message of the channel, by short polls: (id, data)."""
    out: list[tuple[str, dict[str, Any]]] = []
    after = "0"
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while True:
            response = await http.get(
                f"/v1/channels/{CHANNEL}/messages", params={"after": after, "limit": 1000}
            )
            assert response.status_code == 200, response.text
            page = response.json()
            out.extend((m["id"], m["data"]) for m in page["messages"])
            if not page["messages"]:
                return out
            after = page["next_after"]


def check_acknowledged(
    stored: list[tuple[str, dict[str, Any]]], acked: dict[str, list[tuple[int, str]]]
) -> None:
    """Every acknowledged publish is stored once, under the id it was acknowledged with, and
    each publisher's messages are stored in the order it sent them."""
    where: dict[tuple[str, int], list[str]] = {}
    order: dict[str, list[int]] = {}
    for message_id, data in stored:
        where.setdefault((data["p"], data["n"]), []).append(message_id)
        order.setdefault(data["p"], []).append(data["n"])
    for name, pairs in acked.items():
        for n, message_id in pairs:
            assert where.get((name, n)) == [message_id], (name, n, message_id, where.get((name, n)))
        sent = order.get(name, [])
        assert sent == sorted(set(sent)), f"{name}'s messages are stored out of order or twice"


async def wait_until(condition: Callable[[], bool], alive: Callable[[], Awaitable[None]]) -> None:
    """Wait for ``condition``; raises TimeoutError after HANG_GUARD seconds."""
    async with asyncio.timeout(HANG_GUARD):
        while not condition():
            await alive()
            await asyncio.sleep(0.02)


def hub_log_problems(log_dir: Path) -> list[str]:
    problems = []
    for path in sorted(log_dir.glob("hub-*.err")):
        for line in path.read_text(errors="replace").splitlines():
            if " ERROR " in line or line.startswith(("ERROR", "Traceback")):
                problems.append(f"{path.name}: {line}")
    return problems


async def test_acknowledged_publishes_survive_kill_9_and_subscribers_get_each_once(
    hub_factory: type[HubProcess], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rounds = int(request.config.getoption("--crash-rounds"))
    port = free_port_below_ephemeral(set())
    tcp_port = free_port_below_ephemeral({port})
    hub = hub_factory(
        "--port",
        str(port),
        "--tcp-port",
        str(tcp_port),
        "--retention-count",
        "1000000000",
        "--sse-retry",
        "0.1",
    )
    start(hub)
    url, ws_url = hub.url, "ws" + hub.url.removeprefix("http")

    stop = asyncio.Event()
    gate = asyncio.Event()  # publishers start an attempt only while it is set
    gate.set()
    publishers = {name: Publisher(name) for name in ("http", "mux", "tcp")}
    publishing = [
        asyncio.create_task(publish_http(url, publishers["http"], stop, gate)),
        asyncio.create_task(publish_mux(ws_url, publishers["mux"], stop, gate)),
        asyncio.create_task(publish_tcp(tcp_port, publishers["tcp"], stop, gate)),
    ]
    subscribers = {f"sdk-{via}": Subscriber(f"sdk-{via}") for via in SDK_VIAS}
    subscribers.update({f"raw-{t}": Subscriber(f"raw-{t}") for t in RAW_TRANSPORTS})
    client = AsyncClient(url, tcp_port=tcp_port, resilience=QUICK)
    subscribing = [
        asyncio.create_task(subscribe_sdk(client, via, subscribers[f"sdk-{via}"]))
        for via in SDK_VIAS
    ] + [
        asyncio.create_task(subscribe_raw(url, tcp_port, t, subscribers[f"raw-{t}"]))
        for t in RAW_TRANSPORTS
    ]
    tasks = publishing + subscribing

    async def alive() -> None:
        """Fail at once, with its error, if a publisher or subscriber gave up."""
        for task in subscribing if stop.is_set() else tasks:
            if task.done():
                task.result()  # raises what ended it
                raise AssertionError(f"{task.get_coro()} ended")

    def state() -> str:
        return json.dumps(
            {
                "acked": {p.name: len(p.acked) for p in publishers.values()},
                "received": {s.name: len(s.ids) for s in subscribers.values()},
                "errors": {s.name: s.errors for s in subscribers.values() if s.errors},
            }
        )

    in_flight_found: list[int] = []
    try:
        for _ in range(rounds):
            acked_before = {p.name: len(p.acked) for p in publishers.values()}
            received_before = {s.name: len(s.ids) for s in subscribers.values()}

            def progressed(
                acked_before: dict[str, int] = acked_before,
                received_before: dict[str, int] = received_before,
            ) -> bool:
                return all(
                    len(p.acked) >= acked_before[p.name] + PROGRESS for p in publishers.values()
                ) and all(
                    len(s.ids) >= received_before[s.name] + PROGRESS for s in subscribers.values()
                )

            try:
                await wait_until(progressed, alive)
            except TimeoutError:
                raise AssertionError(f"no progress before the kill: {state()}") from None
            # No await from here to the kill: what is in flight stays in flight. The gate
            # keeps the publishers from trying again until the store has been read.
            gate.clear()
            acked = {p.name: list(p.acked) for p in publishers.values()}
            hub.kill()
            # Started in a thread: meanwhile the clients find the hub down and retry.
            await asyncio.to_thread(start, hub)
            stored = await read_channel(url)
            check_acknowledged(stored, acked)
            # The message each publisher had not had acknowledged when the hub died: stored
            # or not, both are fine (it is sent again with its key, and stored once).
            keys = {(d["p"], d["n"]) for _, d in stored}
            found = sum((name, len(pairs)) in keys for name, pairs in acked.items())
            in_flight_found.append(found)
            assert len(stored) == sum(map(len, acked.values())) + found
            gate.set()

        stop.set()
        async with asyncio.timeout(HANG_GUARD):
            await asyncio.gather(*publishing)
        stored = await read_channel(url)
        everything = [message_id for message_id, _ in stored]

        def caught_up() -> bool:
            return all(s.last >= everything[-1] for s in subscribers.values())

        try:
            await wait_until(caught_up, alive)
        except TimeoutError:
            raise AssertionError(f"subscribers did not catch up: {state()}") from None
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()

    # Every publisher's last message was acknowledged: the store holds exactly what was.
    check_acknowledged(stored, {p.name: p.acked for p in publishers.values()})
    assert len(stored) == sum(len(p.acked) for p in publishers.values())
    for sub in subscribers.values():
        if sub.subscription is not None:
            sub.duplicates = sub.subscription.resume.duplicates
            sub.retries = sub.subscription.resume.reconnects
    report = {
        "rounds": rounds,
        "stored": len(stored),
        "publishers": {
            p.name: {"acked": len(p.acked), "failed_attempts": p.attempts_failed}
            for p in publishers.values()
        },
        "http_acks_that_were_replays": publishers["http"].replayed,
        "unacknowledged_but_stored_at_each_kill": in_flight_found,
        "subscribers": {
            s.name: {
                "received": len(s.ids),
                "duplicates": s.duplicates,
                **({"retries": s.retries} if s.subscription else {"connections": s.connections}),
            }
            for s in subscribers.values()
        },
    }
    print(json.dumps(report))
    for sub in subscribers.values():
        assert sub.ids == everything, sub.name  # exactly once, in order, after de-duplication
        # The hub resumes from a cursor without repeating anything, so there was nothing to drop.
        assert sub.duplicates == 0, (sub.name, report)
        if sub.subscription is None:  # a raw push client: each kill broke its connection
            assert sub.connections == rounds + 1, (sub.name, report)
    assert not hub_log_problems(tmp_path)
