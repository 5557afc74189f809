"""The job part of the Store behaviour suite, for every implementation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from backchannel.core import jobs
from backchannel.core.jobs import Job, JobState
from backchannel.core.store import Store
from backchannel.store import MemoryStore, RedisStore, SQLiteStore

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
