"""The hub over the memory store, with a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from backchannel.core import (
    Hub,
    InvalidRequest,
    Limits,
    Listener,
    Message,
    Retention,
    TooBusy,
    Unavailable,
)
from backchannel.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryStore):
    """Counts reads, so tests can see reads being shared."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.reads = 0

    async def read(self, channel: str, **kwargs: int) -> list[Message]:  # type: ignore[override]
        self.reads += 1
        await asyncio.sleep(0)  # a real store answers later, letting other readers join
        return await super().read(channel, **kwargs)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def hub(clock: Clock) -> AsyncIterator[Hub]:
    store = CountingStore(retention=Retention(max_count=1000, max_age_ms=60_000))
    h = Hub(store, limits=Limits(max_long_polls=50, max_wait=10), clock=clock)
    await h.start()
    yield h
    await h.stop()


async def text(hub: Hub, channel: str, body: str) -> str:
    appended = await hub.publish(channel, body.encode(), content_type="text/plain")
    return appended.message.id


async def test_publish_then_poll(hub: Hub) -> None:
    first = await text(hub, "news", "a")
    second = await text(hub, "news", "b")
    page = await hub.poll("news")
    assert [m.data for m in page.messages] == [b"a", b"b"]
    assert page.next_after == second
    assert (await hub.poll("news", after=int(first, 16))).messages[0].data == b"b"


async def test_empty_poll_keeps_the_cursor(hub: Hub) -> None:
    page = await hub.poll("nobody", after=5)
    assert page.messages == []
    assert page.next_after == "0000000000000005"
    assert (await hub.poll("nobody")).next_after == "0000000000000000"


async def test_age_retention_follows_the_clock(hub: Hub, clock: Clock) -> None:
    await text(hub, "c", "old")
    clock.now += 30
    await text(hub, "c", "new")
    clock.now += 31
    assert [m.data for m in (await hub.poll("c")).messages] == [b"new"]
    info = await hub.info("c")
    assert (info.retained, info.first_id, info.last_id) == (
        1,
        "0000000000000002",
        "0000000000000002",
    )
    clock.now += 60
    info = await hub.info("c")
    assert (info.retained, info.first_id) == (0, None)


async def test_long_poll_is_released_by_a_publish(hub: Hub) -> None:
    waiting = asyncio.create_task(hub.poll("c", wait=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await text(hub, "c", "wake")
    page = await asyncio.wait_for(waiting, 2)
    assert [m.data for m in page.messages] == [b"wake"]


async def test_long_poll_ignores_other_channels(hub: Hub) -> None:
    waiting = asyncio.create_task(hub.poll("c", wait=0.2))
    await asyncio.sleep(0.01)
    await text(hub, "other", "not for you")
    page = await waiting
    assert page.messages == []


async def test_long_poll_answers_at_once_when_messages_exist(hub: Hub) -> None:
    await text(hub, "c", "already here")
    page = await asyncio.wait_for(hub.poll("c", wait=10), 1)
    assert len(page.messages) == 1


async def test_long_poll_times_out_empty_with_the_same_cursor(hub: Hub) -> None:
    await text(hub, "c", "seen")
    page = await hub.poll("c", after=1, wait=0.05)
    assert page.messages == []
    assert page.next_after == "0000000000000001"


async def test_waiters_share_one_read(hub: Hub) -> None:
    store = hub.store
    assert isinstance(store, CountingStore)
    waiters = [asyncio.create_task(hub.poll("c", wait=5)) for _ in range(40)]
    await asyncio.sleep(0.05)
    assert (await hub.info("c")).subscribers == {"longpoll": 40}
    before = store.reads
    await text(hub, "c", "one")
    pages = await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert all([m.data for m in p.messages] == [b"one"] for p in pages)
    assert store.reads - before == 1
    assert (await hub.info("c")).subscribers == {}
    assert hub.statistics()["long_polls"] == 0


async def test_long_polls_beyond_the_limit_are_refused(hub: Hub) -> None:
    waiters = [asyncio.create_task(hub.poll("c", wait=5)) for _ in range(50)]
    await asyncio.sleep(0.02)
    with pytest.raises(TooBusy):
        await hub.poll("c", wait=1)
    assert len((await hub.poll("c")).messages) == 0  # short polls still work
    await text(hub, "c", "release")
    await asyncio.gather(*waiters)


async def test_cancelled_long_poll_leaves_nothing_behind(hub: Hub) -> None:
    waiting = asyncio.create_task(hub.poll("c", wait=5))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert hub.statistics() == {"long_polls": 0, "channels_waited_on": 0, "reads_in_flight": 0}
    assert (await hub.info("c")).subscribers == {}


async def test_shutdown_releases_long_polls_at_once(hub: Hub) -> None:
    waiters = [asyncio.create_task(hub.poll("c", wait=10)) for _ in range(5)]
    await asyncio.sleep(0.01)
    hub.begin_shutdown()
    pages = await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert all(p.messages == [] for p in pages)
    with pytest.raises(Unavailable):
        await hub.poll("c")


@pytest.mark.parametrize(
    ("call", "kind"),
    [
        (lambda h: h.poll("bad/name"), "invalid-channel"),
        (lambda h: h.poll("x" * 201), "invalid-channel"),
        (lambda h: h.poll("c", limit=0), "limit-out-of-range"),
        (lambda h: h.poll("c", limit=1001), "limit-out-of-range"),
        (lambda h: h.poll("c", wait=-1), "wait-out-of-range"),
        (lambda h: h.poll("c", wait=11), "wait-out-of-range"),
        (lambda h: h.publish("c", b"{", content_type="application/json"), "malformed-json"),
        (lambda h: h.publish("c", b"\xff", content_type="text/plain"), "invalid-text"),
        (lambda h: h.publish("c", b"x" * ((1 << 20) + 1)), "message-too-large"),
        (lambda h: h.publish("c", b"x", idempotency_key=""), "invalid-idempotency-key"),
        (lambda h: h.publish("c", b"x", idempotency_key="a b"), "invalid-idempotency-key"),
        (lambda h: h.publish("c", b"x", idempotency_key="k" * 256), "invalid-idempotency-key"),
    ],
)
async def test_bad_input_is_refused_with_its_kind(hub: Hub, call, kind: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest) as info:
        await call(hub)
    assert info.value.kind == kind
    assert (await hub.info("c")).last_id == "0000000000000000"


@pytest.mark.parametrize("name", ["a", "A-z_0.9:x@y", "x" * 200])
async def test_valid_channel_names(hub: Hub, name: str) -> None:
    await text(hub, name, "ok")
    assert (await hub.info(name)).retained == 1


async def test_sweeper_deletes_expired_messages(clock: Clock) -> None:
    store = MemoryStore(retention=Retention(max_count=10, max_age_ms=1000))
    hub = Hub(store, limits=Limits(sweep_interval=0.01), clock=clock)
    await hub.start()
    try:
        await text(hub, "c", "x")
        clock.now += 2
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not store._channels["c"].messages:
                break
        assert store._channels["c"].messages == []
    finally:
        await hub.stop()


class LossyStore(MemoryStore):
    """A shared store whose link lost notifications: appends are stored but not announced,
    until :meth:`resync` tells the listeners so."""

    def __init__(self) -> None:
        super().__init__()
        self.resync_listeners: list[Callable[[], None]] = []
        self.silent = False

    def add_listener(self, listener: Listener) -> None:
        super().add_listener(lambda c, m: None if self.silent else listener(c, m))

    def add_resync_listener(self, listener: Callable[[], None]) -> None:
        self.resync_listeners.append(listener)

    def resync(self) -> None:
        for listener in self.resync_listeners:
            listener()


async def test_a_resync_makes_long_polls_and_subscriptions_read_again() -> None:
    store = LossyStore()
    hub = Hub(store, limits=Limits(max_wait=10))
    await hub.start()
    try:
        sent: list[int] = []

        class Sink:
            closed = False

            def write(self, data: bytes) -> None:
                sent.append(int(data))

            def flush(self) -> None:
                pass

            def buffered(self) -> int:
                return 0

            async def drained(self) -> None:
                return None

            def close(self, reason: object) -> None:
                self.closed = True

        hub.subscribe("c", Sink(), lambda m: str(m.seq).encode(), transport="t", after=0)
        waiting = asyncio.create_task(hub.poll("c", wait=10))
        await asyncio.sleep(0.01)
        store.silent = True
        await text(hub, "c", "unheard")
        await asyncio.sleep(0.01)
        assert not waiting.done() and sent == []
        store.silent = False
        store.resync()
        page = await asyncio.wait_for(waiting, 5)
        assert [m.data for m in page.messages] == [b"unheard"]
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.001)
        assert sent == [1]
    finally:
        await hub.stop()
