"""What only a shared store must do: two RedisStore instances on one real redis-server are two
hub nodes. The behaviour every store shares is in test_behaviour.py and test_jobs_store.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from backchannel.core import Draft, Hub, Message, Unavailable
from backchannel.core import jobs as jobsteps
from backchannel.core.fanout import CloseReason
from backchannel.core.jobqueue import JobQueue
from backchannel.core.jobs import Job
from backchannel.store import RedisStore, open_store

from ..redis_server import RedisServer, new_prefix

T0 = 1_800_000_000_000


def draft(text: str) -> Draft:
    return Draft(content_type="text/plain", data=text.encode())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``condition`` (a deadline for failing, not a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
async def nodes(redis_server: RedisServer, prefix: str) -> AsyncIterator[list[RedisStore]]:
    """Two stores on one Redis and one prefix: two hub nodes."""
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(2)]
    for store in stores:
        await store.open()
    yield stores
    for store in stores:
        await store.close()


class Heard:
    def __init__(self, store: RedisStore) -> None:
        self.messages: list[Message] = []
        self.jobs: list[Job] = []
        self.resyncs = 0
        store.add_listener(self.on_messages)
        store.add_job_listener(self.jobs.append)
        store.add_resync_listener(self.on_resync)

    def on_messages(self, channel: str, messages: Sequence[Message]) -> None:
        self.messages.extend(messages)

    def on_resync(self) -> None:
        self.resyncs += 1

    def seqs(self, channel: str) -> list[int]:
        return [m.seq for m in self.messages if m.channel == channel]


async def test_an_append_on_one_node_reaches_both_in_order_once(nodes: list[RedisStore]) -> None:
    a, b = nodes
    heard_a, heard_b = Heard(a), Heard(b)
    appended = [await a.append("news", draft(f"m{i}"), now_ms=T0 + i) for i in range(20)]
    await b.append("other", draft("x"), now_ms=T0)
    await until(lambda: len(heard_a.messages) == 21 and len(heard_b.messages) == 21)
    await asyncio.sleep(0.05)  # room for a duplicate to show up, if there were one
    for heard in (heard_a, heard_b):
        assert heard.seqs("news") == list(range(1, 21))  # its own appends too, exactly once
        assert [(m.id, m.data, m.time_ms) for m in heard.messages if m.channel == "news"] == [
            (r.message.id, r.message.data, r.message.time_ms) for r in appended
        ]
        assert heard.seqs("other") == [1]
    assert heard_a.resyncs == heard_b.resyncs == 0


async def test_concurrent_appends_from_two_nodes_never_share_a_seq(
    nodes: list[RedisStore],
) -> None:
    a, b = nodes
    results = await asyncio.gather(
        *(
            node.append("c", draft(f"{n}-{i}"), now_ms=T0)
            for i in range(60)
            for n, node in enumerate(nodes)
        )
    )
    seqs = [r.message.seq for r in results]
    assert sorted(seqs) == list(range(1, 121))
    stored = await b.read("c", after=0, limit=1000, max_bytes=1 << 20, now_ms=T0)
    assert {(m.seq, m.data) for m in stored} == {(r.message.seq, r.message.data) for r in results}
    assert (await a.stats("c", now_ms=T0)).last_seq == 120


async def test_a_job_claimed_on_both_nodes_is_won_by_exactly_one(nodes: list[RedisStore]) -> None:
    a, b = nodes
    heard_b = Heard(b)
    made, _ = await a.job_create(
        jobsteps.submitted("q", b"{}", 100, T0), idempotency_key=None, now_ms=T0
    )
    for _ in range(20):
        current = await a.job_get(made.id)
        assert current is not None
        # Both nodes read the same version and try to move it on: one compare-and-set wins.
        first, second = jobsteps.claimed(current, T0, 1000), jobsteps.claimed(current, T0, 1000)
        won = await asyncio.gather(a.job_update(first), b.job_update(second))
        assert sorted(won) == [False, True]
        winner = first if won[0] else second
        assert await b.job_get(made.id) == winner
        back = jobsteps.expired(winner, T0 + 2000)
        assert back is not None and await b.job_update(back)
        made = back
    # Node b heard every change made on either node, in order, once: 1 + 20 * 2 versions.
    await until(lambda: len(heard_b.jobs) == 41)
    assert [j.version for j in heard_b.jobs] == list(range(1, 42))


async def test_a_job_idempotency_key_is_shared_by_the_nodes(nodes: list[RedisStore]) -> None:
    a, b = nodes
    first, replayed = await a.job_create(
        jobsteps.submitted("q", b"{}", 3, T0), idempotency_key="k", now_ms=T0
    )
    again, replayed_again = await b.job_create(
        jobsteps.submitted("q", b"{}", 3, T0), idempotency_key="k", now_ms=T0 + 1
    )
    assert (replayed, replayed_again) == (False, True)
    assert again == first


async def test_scripts_are_loaded_again_after_a_flush(
    nodes: list[RedisStore], redis_server: RedisServer
) -> None:
    a, _ = nodes
    await a.append("c", draft("1"), now_ms=T0)
    assert redis_server.command("SCRIPT", "FLUSH") == "OK"
    assert (await a.append("c", draft("2"), now_ms=T0)).message.seq == 2  # NOSCRIPT, load, run


def _in_another_process_like_thread(
    url: str, prefix: str, work: Callable[[RedisStore], object]
) -> None:
    """Run ``work`` on a third node with its own event loop, while the caller's loop is held:
    whatever it appends is published while the held loop cannot read a thing."""

    async def run() -> None:
        store = RedisStore(url, prefix=prefix)
        await store.open()
        try:
            result = work(store)
            if asyncio.iscoroutine(result):
                await result
        finally:
            await store.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result(30)


class ListSink:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.reason: CloseReason | None = None

    def write(self, data: bytes) -> None:
        self.sent.append(int(data))

    def flush(self) -> None:
        pass

    def buffered(self) -> int:
        return 0

    async def drained(self) -> None:
        return None

    def close(self, reason: CloseReason) -> None:
        self.reason = reason

    @property
    def closed(self) -> bool:
        return self.reason is not None


async def test_a_dropped_pubsub_link_resyncs_and_nothing_is_missed(
    redis_server: RedisServer, prefix: str
) -> None:
    store = RedisStore(redis_server.url, prefix=prefix)
    hub = Hub(store)
    queue = JobQueue(store, now_ms=hub.now_ms)
    heard = Heard(store)
    await hub.start()
    queue.start()
    try:
        sink = ListSink()
        hub.subscribe("push", sink, lambda m: str(m.seq).encode(), transport="t", after=0)
        for i in range(3):
            await hub.publish("push", f"{i}".encode())
        await until(lambda: sink.sent == [1, 2, 3])
        poll = asyncio.create_task(hub.poll("polled", after=0, wait=30))
        claim = asyncio.create_task(queue.claim("work", wait=30))
        await asyncio.sleep(0.1)  # both are waiting now (a poll answers at once otherwise)
        assert not poll.done() and not claim.done()

        async def publish_meanwhile(other: RedisStore) -> None:
            for i in range(3, 8):
                await other.append("push", draft(f"{i}"), now_ms=hub.now_ms())
            await other.append("polled", draft("p"), now_ms=hub.now_ms())
            await other.job_create(
                jobsteps.submitted("work", b"{}", 3, hub.now_ms()),
                idempotency_key=None,
                now_ms=hub.now_ms(),
            )

        # Held loop: this node's link is cut and the other node publishes before it can notice.
        assert redis_server.command("CLIENT", "KILL", "TYPE", "pubsub") not in (None, "0")
        _in_another_process_like_thread(redis_server.url, prefix, publish_meanwhile)

        await until(lambda: heard.resyncs == 1)
        # Caught up from the store without another publish to reveal the gap.
        await until(lambda: sink.sent == [1, 2, 3, 4, 5, 6, 7, 8])
        page = await asyncio.wait_for(poll, 10)
        assert [m.data for m in page.messages] == [b"p"]
        taken = await asyncio.wait_for(claim, 10)
        assert taken is not None and taken.queue == "work"
        await hub.publish("push", b"8")
        await until(lambda: len(sink.sent) == 9)
        assert sink.sent == list(range(1, 10))
        assert heard.seqs("push")[-1] == 9  # live notifications flow again
        await store.ping()
    finally:
        await queue.stop()
        await hub.stop()


async def test_redis_down_is_unavailable_and_the_link_comes_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url, prefix="down")
    heard = Heard(store)
    await store.open()
    try:
        await store.append("c", draft("1"), now_ms=T0)
        server.stop(kill=True)
        with pytest.raises(Unavailable):
            await store.append("c", draft("2"), now_ms=T0)
        with pytest.raises(Unavailable):
            await store.read("c", after=0, limit=10, max_bytes=1 << 20, now_ms=T0)
        await until(lambda: not store._linked)
        with pytest.raises(Unavailable):
            await store.ping()
        server.start()  # same port, empty (no persistence in this test)
        await until(lambda: heard.resyncs == 1, timeout=20)
        await store.ping()
        appended = await store.append("c", draft("again"), now_ms=T0)
        assert appended.message.seq == 1  # Redis kept nothing: see docs/scaling.md
        await until(lambda: heard.seqs("c")[-1:] == [1] and len(heard.messages) == 2)
    finally:
        await store.close()
        server.stop()


async def test_open_store_reads_the_prefix_and_passes_the_rest_on(
    redis_server: RedisServer,
) -> None:
    store = open_store(f"{redis_server.url}?prefix=pfx.1&socket_timeout=3")
    assert isinstance(store, RedisStore)
    assert store.prefix == "pfx.1"
    assert store.url == f"{redis_server.url}?socket_timeout=3"
    await store.open()
    try:
        await store.append("c", draft("x"), now_ms=T0)
        assert redis_server.command("EXISTS", "pfx.1:m:c") == "1"
    finally:
        await store.close()
    assert open_store("redis://127.0.0.1:1/0").prefix == "backchannel"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="prefix"):
        open_store("redis://127.0.0.1:1/0?prefix=has space")


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path / "unix", "--unixsocket", str(path), "--unixsocketperm", "700")
    server.start()
    try:
        store = open_store(f"unix://{path}?db=3&prefix=u")
        assert isinstance(store, RedisStore)
        await store.open()
        try:
            heard = Heard(store)
            await store.append("c", draft("x"), now_ms=T0)
            await until(lambda: heard.seqs("c") == [1])
        finally:
            await store.close()
        with socket.socket(socket.AF_UNIX) as sock:  # db 3 of that server holds the message
            sock.connect(str(path))
            sock.sendall(b"SELECT 3\r\nEXISTS u:m:c\r\n")
            reply = b""
            while reply.count(b"\r\n") < 2:
                reply += sock.recv(100)
        assert reply == b"+OK\r\n:1\r\n"
    finally:
        server.stop()


async def test_an_unreachable_redis_refuses_to_open() -> None:
    from ..redis_server import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Unavailable, match="cannot reach Redis"):
        await store.open()
    with pytest.raises(Unavailable):
        await store.append("c", draft("x"), now_ms=T0)
