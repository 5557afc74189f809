"""Several hub processes on one real redis-server: a message published on one node reaches the
subscribers of every other, cursors work on any node, jobs are claimed once across nodes, a
node killed with SIGKILL costs its clients nothing, and ``--workers N`` runs N such nodes behind
one pair of ports."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..redis_server import RedisServer, new_prefix
from .conftest import HubProcess
from .push_clients import CLIENTS, PushClient

pytestmark = pytest.mark.e2e
SPREAD = 15
COUNTED_AS = {"sse": "sse", "ws": "ws", "mux": "ws", "tcp": "tcp"}


@pytest.fixture
def nodes(hub_factory: type[HubProcess], redis_server: RedisServer) -> list[HubProcess]:
    """Two hub processes sharing one Redis and one key prefix."""
    url = redis_server.url_for(new_prefix())
    return [hub_factory("--store", url).start() for _ in range(2)]


async def publish(http: httpx.AsyncClient, channel: str, texts: list[str]) -> list[str]:
    ids = []
    for text in texts:
        response = await http.post(
            f"/v1/channels/{channel}/messages",
            content=text.encode(),
            headers={"content-type": "text/plain"},
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


async def wait_for_subscribers(hub: HubProcess, channel: str, counts: dict[str, int]) -> None:
    """Until ``hub`` itself counts these subscribers (each node counts only its own)."""
    async with httpx.AsyncClient(base_url=hub.url) as http:
        for _ in range(1000):
            info = (await http.get(f"/v1/channels/{channel}")).json()
            if info["subscribers"] == counts:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"subscribers {counts} never showed: {info['subscribers']}")


def subscriber_counts(transports: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for transport in transports:
        counts[COUNTED_AS[transport]] = counts.get(COUNTED_AS[transport], 0) + 1
    return counts


async def test_a_publish_on_one_node_reaches_every_transport_on_the_other(
    nodes: list[HubProcess],
) -> None:
    a, b = nodes
    transports = sorted(CLIENTS)
    clients = [CLIENTS[t](b.url, b.tcp_port) for t in transports]
    for client in clients:
        await client.connect("news")
    await wait_for_subscribers(b, "news", subscriber_counts(transports))
    async with httpx.AsyncClient(base_url=a.url) as http:
        ids = await publish(http, "news", [f"m{i}" for i in range(30)])
    expected = [(i, f"m{n}") for n, i in enumerate(ids)]
    for transport, client in zip(transports, clients, strict=True):
        assert await client.take(30) == expected, transport
        await client.close()


async def test_a_cursor_from_one_node_resumes_on_the_other(nodes: list[HubProcess]) -> None:
    a, b = nodes
    async with httpx.AsyncClient(base_url=a.url) as http:
        ids = await publish(http, "log", [f"h{i}" for i in range(10)])
    for transport in sorted(CLIENTS):
        first = CLIENTS[transport](a.url, a.tcp_port)
        await first.connect("log", after="0")
        seen = await first.take(4)
        await first.close()
        then = CLIENTS[transport](b.url, b.tcp_port)
        await then.connect("log", after=seen[-1][0])  # the cursor A gave, used on B
        seen += await then.take(6)
        await then.close()
        assert [i for i, _ in seen] == ids, transport
    async with httpx.AsyncClient(base_url=b.url) as http:
        page = (await http.get("/v1/channels/log/messages", params={"after": ids[6]})).json()
    assert [m["id"] for m in page["messages"]] == ids[7:]


def test_jobs_are_claimed_across_nodes_exactly_once_per_lease(nodes: list[HubProcess]) -> None:
    a, b = nodes
    with a.client() as c:
        submitted = [c.post("/v1/queues/work/jobs", json={"n": n}).json()["id"] for n in range(40)]
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(hub: HubProcess, name: str) -> None:
        with hub.client() as c:
            while True:
                response = c.post("/v1/queues/work/claim", params={"wait": 0})
                if response.status_code == 204:
                    return
                assert response.status_code == 200, response.text
                job = response.json()
                with lock:
                    claimed.append((job["id"], name))
                done = c.post(
                    f"/v1/jobs/{job['id']}/complete",
                    json={"lease": job["lease"], "result": name},
                )
                assert done.status_code == 200, done.text

    threads = [
        threading.Thread(target=worker, args=(hub, f"{label}{i}"))
        for label, hub in (("a", a), ("b", b))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ids = [job_id for job_id, _ in claimed]
    assert sorted(ids) == sorted(submitted)  # every job claimed, none twice
    with b.client() as c:
        states = {c.get(f"/v1/jobs/{job_id}").json()["state"] for job_id in submitted}
    assert states == {"succeeded"}


def test_a_long_poll_and_a_claim_on_one_node_are_woken_from_the_other(
    nodes: list[HubProcess],
) -> None:
    a, b = nodes
    results: dict[str, httpx.Response] = {}

    def wait_on_b() -> None:
        with b.client() as c:
            results["poll"] = c.get("/v1/channels/later/messages", params={"wait": 30})

    def claim_on_b() -> None:
        with b.client() as c:
            results["claim"] = c.post("/v1/queues/later/claim", params={"wait": 30})

    threads = [threading.Thread(target=wait_on_b), threading.Thread(target=claim_on_b)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # both are waiting on B
    with a.client() as c:
        published = c.post("/v1/channels/later/messages", json={"x": 1}).json()["id"]
        job = c.post("/v1/queues/later/jobs", json={"y": 2}).json()["id"]
    for thread in threads:
        thread.join(30)
    assert [m["id"] for m in results["poll"].json()["messages"]] == [published]
    assert results["claim"].json()["id"] == job


async def test_kill_9_of_a_node_while_publishing_loses_and_repeats_nothing(
    nodes: list[HubProcess],
) -> None:
    """Subscribers of every transport on A, a publisher writing to A: A dies by SIGKILL in the
    middle. The publisher sends its unanswered message again to B under the same
    Idempotency-Key, the subscribers reconnect to B with the last id they saw, and each ends up
    with every message once, in order."""
    a, b = nodes
    total = 120
    transports = sorted(CLIENTS)
    published: list[tuple[str, str]] = []
    progress = asyncio.Event()

    async def publisher() -> None:
        target = a
        async with httpx.AsyncClient(timeout=10) as http:
            for n in range(total):
                text, key = f"m{n}", f"key-{n}"
                while True:
                    try:
                        response = await http.post(
                            f"{target.url}/v1/channels/kill/messages",
                            content=text.encode(),
                            headers={"content-type": "text/plain", "idempotency-key": key},
                        )
                        if response.status_code == 201:
                            break
                    except httpx.TransportError:
                        pass
                    target = b  # A is gone: same message, same key, other node
                published.append((response.json()["id"], text))
                if n == total // 3:
                    progress.set()
                await asyncio.sleep(0.002)

    async def subscriber(transport: str) -> list[tuple[str, str]]:
        client: PushClient = CLIENTS[transport](a.url, a.tcp_port)
        await client.connect("kill", after="0")
        got: list[tuple[str, str]] = []
        async with asyncio.timeout(60):
            async for received in client.messages():
                got.append(received)
                if len(got) == total:
                    break
            if len(got) < total:  # A went away: go on from the last id seen, on B
                assert client.ended is not None, transport
                await client.close()
                client = CLIENTS[transport](b.url, b.tcp_port)
                await client.connect("kill", after=got[-1][0] if got else "0")
                got += await client.take(total - len(got))
        await client.close()
        return got

    subscribers = [asyncio.create_task(subscriber(t)) for t in transports]
    await wait_for_subscribers(a, "kill", subscriber_counts(transports))
    publishing = asyncio.create_task(publisher())
    await progress.wait()
    await asyncio.to_thread(a.kill)
    await publishing
    assert [text for _, text in published] == [f"m{n}" for n in range(total)]
    ids = [i for i, _ in published]
    assert ids == [f"{n:016x}" for n in range(1, total + 1)]  # no message stored twice
    for transport, task in zip(transports, subscribers, strict=True):
        assert await task == published, transport


@pytest.fixture
def workers_hub(hub_factory: type[HubProcess], redis_server: RedisServer) -> Iterator[HubProcess]:
    hub = hub_factory("--store", redis_server.url_for(), "--workers", "2").start()
    yield hub


def test_two_workers_share_the_ports_and_sigterm_stops_them_all(workers_hub: HubProcess) -> None:
    hub = workers_hub
    assert hub.proc is not None
    children = _children(hub.proc.pid)
    assert len(children) == 2
    # Hold 15 subscriptions open; each worker counts only its own, so answers from both
    # workers show two counts that add up to 15 (an odd number: they cannot be equal).
    # The kernel hashes each connection to a worker: all 15 on one has a chance of 2 in 2**15.
    streams = []
    with httpx.Client(base_url=hub.url, timeout=30) as http:
        for _ in range(SPREAD):
            client = httpx.Client(base_url=hub.url, timeout=30)  # a connection of its own
            request = client.build_request("GET", "/v1/channels/spread/events")
            streams.append((client, client.send(request, stream=True)))
        counts: set[int] = set()
        for _ in range(100):
            with httpx.Client(base_url=hub.url) as fresh:  # a new connection, a new hash
                info = fresh.get("/v1/channels/spread").json()
            counts.add(info["subscribers"].get("sse", 0))
            if len(counts) == 2 and sum(counts) == SPREAD:
                break
            time.sleep(0.01)
        assert len(counts) == 2 and sum(counts) == SPREAD and 0 not in counts, counts
        # A publish through either worker reaches the streams held by both.
        assert http.post("/v1/channels/spread/messages", json={"n": 1}).status_code == 201
        for client, response in streams:
            lines = response.iter_lines()
            assert any('"n":1' in line for line in lines if line.startswith("data:"))
            response.close()
            client.close()
    assert hub.terminate(timeout=30) == 0
    for pid in children:
        assert _gone(pid), f"worker {pid} still runs"


def test_workers_stop_when_their_parent_is_killed(workers_hub: HubProcess) -> None:
    assert workers_hub.proc is not None
    children = _children(workers_hub.proc.pid)
    assert len(children) == 2
    workers_hub.kill()  # SIGKILL: the parent cannot pass anything on
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in children):
        assert time.monotonic() < deadline, "workers outlived their parent"
        time.sleep(0.05)


def test_workers_refuse_a_store_of_one_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backchannel", "serve", "--workers", "2", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "needs a store that several processes share" in done.stderr


def _children(pid: int) -> list[int]:
    found = subprocess.run(
        ["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True, check=False
    )
    return [int(line) for line in found.stdout.split()]


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_what_a_redis_restart_keeps_with_aof_always(
    hub_factory: type[HubProcess], tmp_path: Path
) -> None:
    """Redis with ``appendfsync always`` killed with SIGKILL and started again: every
    acknowledged message, sequence number, idempotency key, retention setting and job is still
    there. While it is down the hub says so (readyz and publishes answer 503) and keeps its
    streams open; afterwards they carry on with nothing missed."""
    server = RedisServer(tmp_path / "aof", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        hub = hub_factory("--store", server.url_for("aof")).start()
        with hub.client() as c:
            first = c.post(
                "/v1/channels/kept/messages",
                content=b"one",
                headers={"content-type": "text/plain", "idempotency-key": "k1"},
            ).json()["id"]
            for text in ("two", "three"):
                c.post("/v1/channels/kept/messages", content=text.encode())
            c.put("/v1/channels/kept", json={"retention": {"max_count": 50}})
            done = c.post("/v1/queues/q/jobs", json={"n": 1}).json()["id"]
            running = c.post("/v1/queues/q/jobs", json={"n": 2}).json()["id"]
            queued = c.post("/v1/queues/q/jobs", json={"n": 3}).json()["id"]
            lease = c.post("/v1/queues/q/claim").json()["lease"]
            c.post(f"/v1/jobs/{done}/complete", json={"lease": lease, "result": "r"})
            assert c.post("/v1/queues/q/claim").json()["id"] == running
        stream = httpx.Client(base_url=hub.url, timeout=60)
        events = stream.send(
            stream.build_request(
                "GET", "/v1/channels/kept/events", headers={"last-event-id": "0000000000000003"}
            ),
            stream=True,
        )
        lines = events.iter_lines()
        with hub.client() as c:
            c.post("/v1/channels/kept/messages", content=b"live")
        data = next(line for line in lines if line.startswith("data:"))
        assert '"id":"0000000000000004"' in data  # the stream is live (its replay is over)

        server.stop(kill=True)
        with hub.client() as c:
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.headers["content-type"] == "application/problem+json"
            refused = c.post("/v1/channels/kept/messages", content=b"lost")
            assert refused.status_code == 503, refused.text
            assert refused.json()["type"].endswith("/unavailable")
            assert refused.headers["retry-after"] == "1"
            assert c.get("/healthz").status_code == 200  # the process itself is fine

        server.start()  # same port, same folder: Redis reads its append-only file
        with hub.client() as c:
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the hub never became ready again"
                time.sleep(0.05)
            replay = c.post(
                "/v1/channels/kept/messages",
                content=b"one",
                headers={"content-type": "text/plain", "idempotency-key": "k1"},
            )
            assert replay.status_code == 201 and replay.json()["id"] == first
            fifth = c.post("/v1/channels/kept/messages", content=b"five").json()["id"]
            assert fifth == "0000000000000005"  # the sequence carried on
            info = c.get("/v1/channels/kept").json()
            assert (info["retained"], info["retention"]["max_count"]) == (5, 50)
            states = [c.get(f"/v1/jobs/{j}").json()["state"] for j in (done, running, queued)]
            assert states == ["succeeded", "running", "queued"]
            assert c.post("/v1/queues/q/claim").json()["id"] == queued
        # The stream opened before the restart is still open and gets the new message.
        data = next(line for line in lines if line.startswith("data:"))
        assert '"id":"0000000000000005"' in data
        events.close()
        stream.close()
    finally:
        server.stop()
