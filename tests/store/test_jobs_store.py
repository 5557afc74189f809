"""The job part of the Store behaviour suite, for every implementation."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from backchannel.core import jobs
from backchannel.core import store as store_batch
from backchannel.core.jobs import Job, JobState
from backchannel.core.store import JobBatchStore, Store
from backchannel.store import MemoryStore, RedisStore, SQLiteStore
from backchannel.store import sqlite as sqlite_store

from ..redis_server import RedisServer, new_prefix

T0 = 1_800_000_000_000
LEASE = 30_000


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore(idempotency_ttl_ms=60_000)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(server.url, prefix=new_prefix(), idempotency_ttl_ms=60_000)
    else:
        s = SQLiteStore(tmp_path / "hub.db", idempotency_ttl_ms=60_000)
    await s.open()
    yield s
    await s.close()


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def job(queue: str = "q", payload: bytes = b'{"n":1}', now: int = T0) -> Job:
    return jobs.submitted(queue, payload, 3, now)


async def test_create_get_round_trip(store: Store) -> None:
    made, replayed = await store.job_create(job(), idempotency_key=None, now_ms=T0)
    assert not replayed
    assert await store.job_get(made.id) == made
    assert await store.job_get("0" * 32) is None


async def test_every_field_survives_an_update(store: Store) -> None:
    made, _ = await store.job_create(job(), idempotency_key=None, now_ms=T0)
    running = jobs.claimed(made, T0 + 1, LEASE)
    assert await store.job_update(running)
    moved = jobs.progressed(running, running.lease or "", b'{"pct":50}', T0 + 2)
    moved = replace(moved, cancel_requested=True, error="e" * 10)
    assert await store.job_update(moved)
    assert await store.job_get(made.id) == moved


async def test_update_is_compare_and_set(store: Store) -> None:
    made, _ = await store.job_create(job(), idempotency_key=None, now_ms=T0)
    first = jobs.claimed(made, T0, LEASE)
    second = jobs.claimed(made, T0, LEASE)  # another node, same starting version
    assert await store.job_update(first)
    assert not await store.job_update(second)
    assert (await store.job_get(made.id)) == first


async def test_idempotency_key_returns_the_first_job_per_queue(store: Store) -> None:
    first, replayed = await store.job_create(job(), idempotency_key="k", now_ms=T0)
    again, replayed_again = await store.job_create(job(), idempotency_key="k", now_ms=T0 + 5)
    other_queue, replayed_other = await store.job_create(
        job("other"), idempotency_key="k", now_ms=T0
    )
    assert (replayed, replayed_again, replayed_other) == (False, True, False)
    assert again.id == first.id and other_queue.id != first.id
    later, replayed_later = await store.job_create(job(), idempotency_key="k", now_ms=T0 + 60_000)
    assert not replayed_later and later.id != first.id


async def test_jobs_made_in_one_millisecond_are_candidates_in_the_order_made(
    store: Store,
) -> None:
    # Redis breaks ties of created_ms by id: ids count up within a millisecond (jobs.new_job_id).
    made = [job(now=T0) for _ in range(30)]
    for one in made:
        await store.job_create(one, idempotency_key=None, now_ms=T0)
    candidates = await store.job_candidates("q", now_ms=T0, limit=50)
    assert [j.id for j in candidates] == [j.id for j in made]


async def test_candidates_are_queued_oldest_first_then_expired_leases(store: Store) -> None:
    a, _ = await store.job_create(job(now=T0), idempotency_key=None, now_ms=T0)
    b, _ = await store.job_create(job(now=T0 + 1), idempotency_key=None, now_ms=T0 + 1)
    c, _ = await store.job_create(job(now=T0 + 2), idempotency_key=None, now_ms=T0 + 2)
    await store.job_create(job("elsewhere"), idempotency_key=None, now_ms=T0)
    running = jobs.claimed(a, T0 + 3, 1000)
    assert await store.job_update(running)
    now = T0 + 10
    assert [j.id for j in await store.job_candidates("q", now_ms=now, limit=10)] == [b.id, c.id]
    later = T0 + 2000  # a's lease has expired
    ids = [j.id for j in await store.job_candidates("q", now_ms=later, limit=10)]
    assert ids == [b.id, c.id, a.id]
    assert len(await store.job_candidates("q", now_ms=later, limit=2)) == 2
    assert [j.id for j in await store.job_expired(now_ms=later, limit=10)] == [a.id]
    assert await store.job_expired(now_ms=now, limit=10) == []


async def test_trim_deletes_only_long_finished_jobs(store: Store) -> None:
    done, _ = await store.job_create(job(), idempotency_key=None, now_ms=T0)
    done = jobs.claimed(done, T0, LEASE)
    assert await store.job_update(done)
    done = jobs.completed(done, done.lease or "", b"1", T0 + 10)
    assert await store.job_update(done)
    waiting, _ = await store.job_create(job(), idempotency_key=None, now_ms=T0)
    assert await store.job_trim(now_ms=T0 + 100, keep_ms=1000) == 0
    assert await store.job_trim(now_ms=T0 + 2000, keep_ms=1000) == 1
    assert await store.job_get(done.id) is None
    assert (await store.job_get(waiting.id)) is not None


async def test_listeners_hear_each_stored_change(store: Store) -> None:
    heard: list[tuple[str, JobState, int]] = []
    store.add_job_listener(lambda j: heard.append((j.id, j.state, j.version)))
    made, _ = await store.job_create(job(), idempotency_key=None, now_ms=T0)
    running = jobs.claimed(made, T0, LEASE)
    await store.job_update(running)
    await store.job_update(jobs.claimed(made, T0, LEASE))  # refused: not heard
    # A shared store hears its own changes back over the network: wait for the second one, then
    # for the refused one it must not hear (an append made after it marks when it would have).
    await _until(lambda: len(heard) >= 2)
    marker, _ = await store.job_create(job("marker"), idempotency_key=None, now_ms=T0)
    await _until(lambda: any(h[0] == marker.id for h in heard))
    heard = [h for h in heard if h[0] != marker.id]
    assert heard == [(made.id, JobState.QUEUED, 1), (made.id, JobState.RUNNING, 2)]


async def test_sqlite_jobs_survive_a_restart(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    made, _ = await store.job_create(job(), idempotency_key="k", now_ms=T0)
    running = jobs.claimed(made, T0, LEASE)
    await store.job_update(running)
    await store.close()
    reopened = SQLiteStore(tmp_path / "hub.db")
    await reopened.open()
    try:
        assert await reopened.job_get(made.id) == running
        replay, replayed = await reopened.job_create(job(), idempotency_key="k", now_ms=T0 + 1)
        assert replayed and replay.id == made.id
    finally:
        await reopened.close()


# -- batches (JobBatchStore, and the fallbacks for a store without it) -------------------------


class SingleItemStore:
    """A memory store seen only through the single-item methods of ``Store``: what the fallbacks
    in ``core.store`` run against (a store written before the batch methods existed)."""

    def __init__(self) -> None:
        self._inner = MemoryStore(idempotency_ttl_ms=60_000)

    def __getattr__(self, name: str) -> object:
        if name in {"job_create_many", "job_update_many", "job_get_many"} | {
            "job_claim",
            "job_change_many",
        }:
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.fixture(params=["memory", "sqlite", "single-item"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore(idempotency_ttl_ms=60_000)
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "hub.db", idempotency_ttl_ms=60_000)
    else:
        s = SingleItemStore()  # type: ignore[assignment]
    await s.open()
    assert isinstance(s, JobBatchStore) == (request.param != "single-item")
    yield s
    await s.close()


async def test_create_many_keys_within_and_across_batches(any_store: Store) -> None:
    first, _ = await any_store.job_create(job(), idempotency_key="old", now_ms=T0)
    a, b, c, d = job(), job(), job(), job("other")
    made = await store_batch.job_create_many(
        any_store, [(a, "new"), (b, "old"), (c, "new"), (d, "new")], now_ms=T0 + 1
    )
    assert made == [(a, False), (first, True), (a, True), (d, False)]  # keys are per queue
    assert await store_batch.job_get_many(any_store, [a.id, c.id, d.id, a.id]) == [a, None, d, a]


async def test_claim_takes_in_order_up_to_count_and_stores_what_take_returns(
    any_store: Store,
) -> None:
    queued = [
        (await any_store.job_create(job(now=T0 + i), idempotency_key=None, now_ms=T0))[0]
        for i in range(5)
    ]
    expiring = jobs.claimed(queued[0], T0, 1000)
    assert await any_store.job_update(expiring)
    seen: list[str] = []

    def take(candidate: Job) -> Job | None:
        seen.append(candidate.id)
        if candidate.id == queued[2].id:
            return None  # left alone: not taken, not counted
        if candidate.state is JobState.RUNNING:
            return jobs.expired(candidate, T0 + 5000)  # back to the queue: stored, not running
        return jobs.claimed(candidate, T0 + 5000, LEASE)

    stored = await store_batch.job_claim(any_store, "q", now_ms=T0 + 5000, count=3, take=take)
    assert seen[:4] == [q.id for q in queued[1:]]  # queued first, oldest first
    assert [j.id for j in stored] == [queued[1].id, queued[3].id, queued[4].id]
    assert all(j.state is JobState.RUNNING for j in stored)
    assert (await any_store.job_get(queued[2].id)) == queued[2]
    rest = await store_batch.job_claim(any_store, "q", now_ms=T0 + 5000, count=3, take=take)
    assert [(j.id, j.state) for j in rest] == [(queued[0].id, JobState.QUEUED)]


async def test_change_many_applies_in_order_and_a_repeated_id_sees_the_change(
    any_store: Store,
) -> None:
    made, _ = await any_store.job_create(job(), idempotency_key=None, now_ms=T0)
    running = jobs.claimed(made, T0, LEASE)
    assert await any_store.job_update(running)
    lease = running.lease or ""
    seen: list[tuple[int, int | None]] = []

    def change(i: int, current: Job | None) -> Job | None:
        seen.append((i, None if current is None else current.version))
        if current is None:
            return None
        if i == 0:
            return jobs.progressed(current, lease, b"1", T0 + 1)
        return jobs.completed(current, lease, b'"done"', T0 + 2)

    out = await store_batch.job_change_many(any_store, [made.id, "0" * 32, made.id], change)
    assert seen == [(0, 2), (1, None), (2, 3)]
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert (out[0].version, out[2].version, out[2].state) == (3, 4, JobState.SUCCEEDED)
    assert await any_store.job_get(made.id) == out[2]


async def test_update_many_is_compare_and_set_per_item(any_store: Store) -> None:
    a, _ = await any_store.job_create(job(), idempotency_key=None, now_ms=T0)
    b, _ = await any_store.job_create(job(), idempotency_key=None, now_ms=T0)
    a1, b1 = jobs.claimed(a, T0, LEASE), jobs.claimed(b, T0, LEASE)
    assert await store_batch.job_update_many(any_store, [a1, jobs.claimed(a, T0, LEASE), b1]) == [
        True,
        False,
        True,
    ]
    assert await store_batch.job_get_many(any_store, [a.id, b.id]) == [a1, b1]


async def test_listeners_hear_a_batch_once_per_stored_change(any_store: Store) -> None:
    heard: list[tuple[str, int]] = []
    any_store.add_job_listener(lambda j: heard.append((j.id, j.version)))
    a, b = job(), job()
    await store_batch.job_create_many(any_store, [(a, "k"), (b, "k")], now_ms=T0)
    claimed = await store_batch.job_claim(
        any_store, "q", now_ms=T0, count=5, take=lambda j: jobs.claimed(j, T0, LEASE)
    )
    for _ in range(50):
        await asyncio.sleep(0)
        if len(heard) == 2:
            break
    assert heard == [(a.id, 1), (a.id, 2)] and [j.id for j in claimed] == [a.id]


async def test_sqlite_candidates_use_the_partial_indexes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "hub.db")
    try:
        plan = " ".join(
            str(row[3])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN " + sqlite_store._JOB_CANDIDATES, ("q", 5, T0, "q", 5, 5)
            )
        )
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    # Claims walk the queued jobs in order and read only the leases that ran out.
    assert "INDEX jobs_queued" in plan and "INDEX jobs_leased" in plan
    assert "jobs_waiting" not in indexes and "jobs_lease" not in indexes


async def test_a_batch_is_claimed_in_the_order_it_was_submitted(any_store: Store) -> None:
    early, _ = await any_store.job_create(job(now=T0 - 5), idempotency_key=None, now_ms=T0)
    batch = [job(now=T0) for _ in range(30)]  # one millisecond: the ids alone do not order them
    await store_batch.job_create_many(any_store, [(j, None) for j in batch], now_ms=T0)
    running = jobs.claimed(early, T0, LEASE)
    assert await any_store.job_update(running)
    back = jobs.failed(running, running.lease or "", "retry me", True, T0 + 1)
    assert await any_store.job_update(back)  # put back: still the oldest

    def take(candidate: Job) -> Job | None:
        return jobs.claimed(candidate, T0 + 2, LEASE)

    taken = await store_batch.job_claim(any_store, "q", now_ms=T0 + 2, count=31, take=take)
    assert [j.id for j in taken] == [early.id] + [j.id for j in batch]
