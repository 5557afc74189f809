"""One behaviour suite for every Store implementation (see backchannel.core.store)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from backchannel.core import Draft, IdempotencyKeyReused, Message, Retention, Store, Unavailable
from backchannel.store import MemoryStore, RedisStore, SQLiteStore, StoreLocked

from ..redis_server import RedisServer, new_prefix

DAY_MS = 86_400_000
T0 = 1_800_000_000_000
DEFAULT = Retention(max_count=100, max_age_ms=DAY_MS)

StoreFactory = Callable[..., Store]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    prefix = new_prefix()  # the same for every store a test makes, as for a restarted hub

    def make(retention: Retention = DEFAULT, idempotency_ttl_ms: int = DAY_MS) -> Store:
        if request.param == "memory":
            return MemoryStore(retention=retention, idempotency_ttl_ms=idempotency_ttl_ms)
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            return RedisStore(
                server.url,
                prefix=prefix,
                retention=retention,
                idempotency_ttl_ms=idempotency_ttl_ms,
            )
        return SQLiteStore(
            tmp_path / "hub.db", retention=retention, idempotency_ttl_ms=idempotency_ttl_ms
        )

    return make


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    s = make_store()
    await s.open()
    yield s
    await s.close()


def draft(text: str, key: str | None = None) -> Draft:
    data = text.encode()
    return Draft(content_type="text/plain", data=data, idempotency_key=key, digest=data[:16])


async def read_all(store: Store, channel: str, after: int = 0, now_ms: int = T0) -> list[int]:
    messages = await store.read(channel, after=after, limit=1000, max_bytes=1 << 30, now_ms=now_ms)
    return [m.seq for m in messages]


async def test_sequence_starts_at_one_and_grows_per_channel(store: Store) -> None:
    seqs = [(await store.append("a", draft(f"m{i}"), now_ms=T0)).message.seq for i in range(3)]
    other = await store.append("b", draft("x"), now_ms=T0)
    assert seqs == [1, 2, 3]
    assert other.message.seq == 1


async def test_read_returns_messages_after_cursor_in_order(store: Store) -> None:
    for i in range(5):
        await store.append("a", draft(f"m{i}"), now_ms=T0 + i)
    messages = await store.read("a", after=2, limit=10, max_bytes=1 << 20, now_ms=T0 + 10)
    assert [(m.seq, m.data, m.content_type) for m in messages] == [
        (3, b"m2", "text/plain"),
        (4, b"m3", "text/plain"),
        (5, b"m4", "text/plain"),
    ]
    assert [m.time_ms for m in messages] == [T0 + 2, T0 + 3, T0 + 4]


async def test_read_respects_limit_and_byte_budget(store: Store) -> None:
    for _ in range(5):
        await store.append("a", draft("x" * 100), now_ms=T0)
    assert len(await store.read("a", after=0, limit=2, max_bytes=1 << 20, now_ms=T0)) == 2
    assert len(await store.read("a", after=0, limit=10, max_bytes=250, now_ms=T0)) == 2
    # One message always fits, however small the budget: otherwise a reader could never advance.
    assert len(await store.read("a", after=0, limit=10, max_bytes=1, now_ms=T0)) == 1


async def test_unknown_channel_reads_empty(store: Store) -> None:
    assert await read_all(store, "nobody") == []
    stats = await store.stats("nobody", now_ms=T0)
    assert (stats.last_seq, stats.retained) == (0, 0)


async def test_bytes_are_kept_exactly(store: Store) -> None:
    payload = bytes(range(256)) * 3
    await store.append(
        "bin", Draft(content_type="application/octet-stream", data=payload), now_ms=T0
    )
    [message] = await store.read("bin", after=0, limit=1, max_bytes=1 << 20, now_ms=T0)
    assert message.data == payload
    assert message.content_type == "application/octet-stream"


async def test_times_never_go_backwards_within_a_channel(store: Store) -> None:
    await store.append("a", draft("late"), now_ms=T0 + 1000)
    second = await store.append("a", draft("clock stepped back"), now_ms=T0)
    assert second.message.time_ms == T0 + 1000


async def test_max_count_keeps_the_newest(make_store: StoreFactory) -> None:
    store = make_store(Retention(max_count=3, max_age_ms=DAY_MS))
    await store.open()
    try:
        for i in range(10):
            await store.append("a", draft(f"m{i}"), now_ms=T0)
        assert await read_all(store, "a") == [8, 9, 10]
        stats = await store.stats("a", now_ms=T0)
        assert (stats.last_seq, stats.first_seq, stats.retained) == (10, 8, 3)
    finally:
        await store.close()


async def test_max_age_hides_at_once_and_trim_deletes(store: Store) -> None:
    await store.append("a", draft("old"), now_ms=T0)
    await store.append("a", draft("new"), now_ms=T0 + DAY_MS // 2)
    later = T0 + DAY_MS + 1
    assert await read_all(store, "a", now_ms=later) == [2]
    stats = await store.stats("a", now_ms=later)
    assert (stats.retained, stats.first_seq) == (1, 2)
    assert await store.trim(now_ms=later) == 1
    assert await store.trim(now_ms=later) == 0
    assert await read_all(store, "a", now_ms=T0) == [2]


async def test_sequence_is_not_reused_after_everything_expired(store: Store) -> None:
    for i in range(3):
        await store.append("a", draft(f"m{i}"), now_ms=T0)
    much_later = T0 + 2 * DAY_MS
    await store.trim(now_ms=much_later)
    assert await read_all(store, "a", now_ms=much_later) == []
    stats = await store.stats("a", now_ms=much_later)
    assert (stats.last_seq, stats.first_seq, stats.retained) == (3, 4, 0)
    again = await store.append("a", draft("next"), now_ms=much_later)
    assert again.message.seq == 4


async def test_channel_retention_overrides_default(store: Store) -> None:
    for i in range(10):
        await store.append("a", draft(f"m{i}"), now_ms=T0)
        await store.append("b", draft(f"m{i}"), now_ms=T0)
    own = Retention(max_count=2, max_age_ms=60_000)
    await store.set_retention("a", max_count=2, max_age_ms=60_000)
    assert await store.get_retention("a") == own
    assert await store.get_retention("b") == DEFAULT
    assert await read_all(store, "a") == [9, 10]  # trimmed when the policy was set
    assert len(await read_all(store, "b")) == 10
    assert await read_all(store, "a", now_ms=T0 + 61_000) == []
    await store.set_retention("a", max_count=None, max_age_ms=None)
    assert await store.get_retention("a") == DEFAULT


async def test_a_limit_left_out_follows_the_default(store: Store) -> None:
    await store.set_retention("a", max_count=5, max_age_ms=None)
    assert await store.get_retention("a") == Retention(max_count=5, max_age_ms=DAY_MS)


async def test_a_lower_default_count_applies_to_reads_before_any_append(
    make_store: StoreFactory,
) -> None:
    store = make_store(Retention(max_count=10, max_age_ms=DAY_MS))
    await store.open()
    for i in range(10):
        await store.append("a", draft(f"m{i}"), now_ms=T0)
    await store.close()
    # The same data under a lower default, as after a restart with a new --retention-count.
    if isinstance(store, MemoryStore):
        store.default_retention = Retention(max_count=4, max_age_ms=DAY_MS)
        lowered: Store = store
    else:
        lowered = make_store(Retention(max_count=4, max_age_ms=DAY_MS))
    await lowered.open()
    try:
        assert await read_all(lowered, "a") == [7, 8, 9, 10]
        stats = await lowered.stats("a", now_ms=T0)
        assert (stats.retained, stats.first_seq) == (4, 7)
        await lowered.trim(now_ms=T0)
        assert await read_all(lowered, "a", after=0) == [7, 8, 9, 10]
    finally:
        await lowered.close()


async def test_idempotency_key_replays_the_first_result(store: Store) -> None:
    first = await store.append("a", draft("once", key="k1"), now_ms=T0)
    again = await store.append("a", draft("once", key="k1"), now_ms=T0 + 5)
    assert not first.replayed
    assert again.replayed
    assert (again.message.seq, again.message.time_ms) == (first.message.seq, first.message.time_ms)
    assert await read_all(store, "a") == [1]
    # Keys belong to a channel.
    elsewhere = await store.append("b", draft("once", key="k1"), now_ms=T0)
    assert not elsewhere.replayed


async def test_idempotency_key_for_a_different_message_is_refused(store: Store) -> None:
    await store.append("a", draft("one", key="k"), now_ms=T0)
    with pytest.raises(IdempotencyKeyReused):
        await store.append("a", draft("two", key="k"), now_ms=T0)
    assert await read_all(store, "a") == [1]


async def test_idempotency_key_expires(make_store: StoreFactory) -> None:
    store = make_store(idempotency_ttl_ms=1000)
    await store.open()
    try:
        await store.append("a", draft("x", key="k"), now_ms=T0)
        later = await store.append("a", draft("x", key="k"), now_ms=T0 + 1000)
        assert not later.replayed
        assert later.message.seq == 2
        await store.trim(now_ms=T0 + 5000)
    finally:
        await store.close()


async def test_concurrent_appends_get_distinct_dense_sequences(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append("a", draft(f"m{i}"), now_ms=T0) for i in range(90))
    )
    assert sorted(r.message.seq for r in results) == list(range(1, 91))
    messages = await store.read("a", after=0, limit=1000, max_bytes=1 << 20, now_ms=T0)
    by_seq = {r.message.seq: r.message.data for r in results}
    assert [(m.seq, m.data) for m in messages] == sorted(by_seq.items())


async def test_concurrent_same_key_stores_once(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append("a", draft("same", key="k"), now_ms=T0) for _ in range(20))
    )
    assert {r.message.seq for r in results} == {1}
    assert sum(not r.replayed for r in results) == 1


async def test_listeners_hear_appends_after_they_are_readable(store: Store) -> None:
    heard: list[tuple[str, int, list[int]]] = []
    seen = asyncio.Event()

    def listener(channel: str, messages: Sequence[Message]) -> None:
        async def check() -> None:
            heard.append((channel, messages[-1].seq, await read_all(store, channel)))
            seen.set()

        asyncio.get_running_loop().create_task(check())

    store.add_listener(listener)
    await store.append("a", draft("x"), now_ms=T0)
    await asyncio.wait_for(seen.wait(), 5)
    assert heard[0] == ("a", 1, [1])


async def test_ping_and_closed_store(make_store: StoreFactory) -> None:
    store = make_store()
    await store.open()
    await store.ping()
    await store.close()
    with pytest.raises(Unavailable):
        await store.append("a", draft("x"), now_ms=T0)


# The memory store keeps nothing across a restart, by design; durable stores must.
async def test_sqlite_reopen_keeps_sequences_history_and_keys(tmp_path: Path) -> None:
    def make_store() -> Store:
        return SQLiteStore(tmp_path / "hub.db", retention=DEFAULT)

    store = make_store()
    await store.open()
    await store.append("a", draft("one", key="k"), now_ms=T0)
    await store.append("a", draft("two"), now_ms=T0)
    await store.set_retention("a", max_count=50, max_age_ms=None)
    await store.close()

    reopened = make_store()
    await reopened.open()
    try:
        assert await read_all(reopened, "a") == [1, 2]
        replay = await reopened.append("a", draft("one", key="k"), now_ms=T0)
        assert replay.replayed and replay.message.seq == 1
        assert (await reopened.append("a", draft("three"), now_ms=T0)).message.seq == 3
        assert (await reopened.get_retention("a")).max_count == 50
    finally:
        await reopened.close()


async def test_sqlite_refuses_a_second_process_on_the_same_file(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "hub.db")
    await first.open()
    try:
        second = SQLiteStore(tmp_path / "hub.db")
        with pytest.raises(StoreLocked, match="in use"):
            await second.open()
    finally:
        await first.close()
    third = SQLiteStore(tmp_path / "hub.db")
    await third.open()  # the lock went with the first store
    await third.close()


async def test_sqlite_one_failing_write_does_not_fail_the_others_in_its_commit(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "hub.db", retention=DEFAULT)
    await store.open()
    try:
        # 2**64 does not fit a SQLite integer: the store itself fails on it (the hub would have
        # refused it earlier). It shares a batch with the appends around it.
        outcomes = await asyncio.gather(
            *(store.append("a", draft(f"m{i}"), now_ms=T0) for i in range(20)),
            store.set_retention("a", max_count=2**64, max_age_ms=None),
            *(store.append("a", draft(f"n{i}"), now_ms=T0) for i in range(20)),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], Unavailable)
        assert await read_all(store, "a") == list(range(1, 41))
        assert await store.get_retention("a") == DEFAULT
    finally:
        await store.close()


async def test_sqlite_a_failed_write_that_created_a_channel_forgets_it(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "hub.db", retention=DEFAULT)
    await store.open()
    try:
        with pytest.raises(Unavailable):
            await store.set_retention("x", max_count=2**64, max_age_ms=None)
        await store.set_retention("y", max_count=5, max_age_ms=None)
        await store.append("x", draft("for x"), now_ms=T0)
        await store.append("y", draft("for y"), now_ms=T0)
        assert [
            m.data for m in await store.read("x", after=0, limit=9, max_bytes=1 << 20, now_ms=T0)
        ] == [b"for x"]
        assert [
            m.data for m in await store.read("y", after=0, limit=9, max_bytes=1 << 20, now_ms=T0)
        ] == [b"for y"]
    finally:
        await store.close()
