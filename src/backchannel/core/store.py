"""The ``Store`` interface: everything the core asks of storage.

Implementations live in :mod:`backchannel.store`. Rules every implementation keeps (the
behaviour suite in ``tests/store`` checks them):

- Sequence numbers of a channel start at 1, grow by one per appended message and are never
  reused, even after retention removes every message of the channel or the process restarts.
- ``append`` returns only once the message is durable to the degree the store promises (the
  SQLite store: survives a crash of the process).
- Retention applies to reads at once: ``read`` and ``stats`` see only the newest
  ``max_count`` messages of a channel, none older than ``max_age_ms`` before ``now_ms``, even
  while the rows are still stored; appends and ``trim`` delete what it hides.
- An ``idempotency_key`` already used in the channel within the key's lifetime returns the
  first message with ``replayed=True``; with a different ``digest`` it raises
  :class:`~backchannel.core.errors.IdempotencyKeyReused`.
- Jobs are kept with a ``version``: ``job_update`` replaces a job only if the stored one is the
  version before it (compare-and-set), so concurrent changes from several hub processes
  cannot both win. Job listeners hear every stored change, from any process.
- The batch methods of :class:`JobBatchStore` are optional: a store that has them does a batch
  in one go (the SQLite store: in one transaction), and behaves as the single-item methods
  applied in order. Call them through :func:`job_create_many`, :func:`job_update_many` and
  :func:`job_get_many`, which fall back to the single-item methods for a store without them.
- Listeners are called on the event loop with ``(channel, messages)`` after messages are
  durably appended: the new messages of one channel, in sequence order, as many as were
  committed together. A store shared by several hub processes calls them for appends made by
  any process.
- A store shared by several processes hears of their appends and job changes over a link
  that can lose notifications (Redis pub/sub, when the connection drops). When such a link is
  back, the store calls its resync listeners: whatever waits for notifications must then read
  the store again for what it may have missed. Stores that cannot lose a notification (memory,
  SQLite) never call them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, cast, runtime_checkable

from .channels import Retention
from .jobs import Job, JobState
from .messages import Appended, ChannelStats, Draft, Message

Listener = Callable[[str, Sequence[Message]], None]
JobListener = Callable[[Job], None]
ResyncListener = Callable[[], None]


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the store cannot serve requests now."""

    def add_listener(self, listener: Listener) -> None: ...

    def add_resync_listener(self, listener: ResyncListener) -> None:
        """Call ``listener`` (no arguments, on the event loop) whenever notifications may have
        been lost."""

    async def append(self, channel: str, draft: Draft, *, now_ms: int) -> Appended: ...

    async def read(
        self, channel: str, *, after: int, limit: int, max_bytes: int, now_ms: int
    ) -> list[Message]:
        """Up to ``limit`` messages with ``seq > after``, oldest first, stopping once their
        data adds up to ``max_bytes`` (at least one message is always returned if any)."""

    async def stats(self, channel: str, *, now_ms: int) -> ChannelStats: ...

    async def get_retention(self, channel: str) -> Retention:
        """The channel's policy: its own if set, else the store's default."""

    async def set_retention(
        self, channel: str, *, max_count: int | None, max_age_ms: int | None
    ) -> None:
        """Give the channel its own limits; ``None`` for a limit means the store's default."""

    async def trim(self, *, now_ms: int) -> int:
        """Delete expired messages and idempotency keys; return how many messages went."""

    # -- jobs ---------------------------------------------------------------------------------

    def add_job_listener(self, listener: JobListener) -> None: ...

    async def job_create(
        self, job: Job, *, idempotency_key: str | None, now_ms: int
    ) -> tuple[Job, bool]:
        """Store a new job. If ``idempotency_key`` was used for a job of the same queue within
        the key's lifetime, store nothing and return that job, with True."""

    async def job_get(self, job_id: str) -> Job | None: ...

    async def job_update(self, job: Job) -> bool:
        """Store ``job`` if the stored one has version ``job.version - 1``; False if not."""

    async def job_candidates(self, queue: str, *, now_ms: int, limit: int) -> list[Job]:
        """Jobs a worker of ``queue`` could take now, oldest first: queued ones, and running
        ones whose lease has expired."""

    async def job_expired(self, *, now_ms: int, limit: int) -> list[Job]:
        """Running jobs of any queue whose lease has expired."""

    async def job_trim(self, *, now_ms: int, keep_ms: int) -> int:
        """Delete jobs that finished more than ``keep_ms`` ago; return how many."""


#: What a claim does to a candidate: its next version (running, or dead or cancelled after an
#: expired lease), or None to leave it.
Take = Callable[[Job], Job | None]
#: What a change does to item ``i`` of a batch: the job's next version, or None to leave it.
Change = Callable[[int, Job | None], Job | None]
#: Rounds of compare-and-set the fallbacks try before they give up on an item.
CAS_ATTEMPTS = 20


@runtime_checkable
class JobBatchStore(Protocol):
    """What a store may add to :class:`Store` to handle many jobs at once. Each method means
    what the single-item methods would, applied to the items in order; ``job_claim`` and
    ``job_change_many`` also read and write each job in one step, so that no other change comes
    in between (the SQLite store does a whole call in its writer thread, in one transaction)."""

    async def job_create_many(
        self, items: Sequence[tuple[Job, str | None]], *, now_ms: int
    ) -> list[tuple[Job, bool]]:
        """``job_create`` of each ``(job, idempotency_key)``: a key used earlier in the same
        batch returns that earlier job."""

    async def job_update_many(self, jobs: Sequence[Job]) -> list[bool]:
        """``job_update`` of each job: compare-and-set, each on its own."""

    async def job_get_many(self, job_ids: Sequence[str]) -> list[Job | None]: ...

    async def job_claim(self, queue: str, *, now_ms: int, count: int, take: Take) -> list[Job]:
        """Apply ``take`` to the candidates of ``queue`` (as ``job_candidates`` orders them),
        storing each version it returns, until ``count`` of them are running; return the
        versions stored, in order."""

    async def job_change_many(self, job_ids: Sequence[str], change: Change) -> list[Job | None]:
        """For each id in order, store ``change(i, job)`` of the job as it is (None if there is
        none) unless it is None; return what was stored for each item (None: nothing)."""


_BATCH_STORES: dict[type, bool] = {}


def _batches(store: Store) -> bool:
    """Is ``store`` a :class:`JobBatchStore`? (Cached: checking a protocol is slow.)"""
    kind = type(store)
    found = _BATCH_STORES.get(kind)
    if found is None:
        found = _BATCH_STORES[kind] = isinstance(store, JobBatchStore)
    return found


async def job_create_many(
    store: Store, items: Sequence[tuple[Job, str | None]], *, now_ms: int
) -> list[tuple[Job, bool]]:
    if _batches(store):
        return await cast(JobBatchStore, store).job_create_many(items, now_ms=now_ms)
    return [await store.job_create(job, idempotency_key=key, now_ms=now_ms) for job, key in items]


async def job_update_many(store: Store, jobs: Sequence[Job]) -> list[bool]:
    if _batches(store):
        return await cast(JobBatchStore, store).job_update_many(jobs)
    return [await store.job_update(job) for job in jobs]


async def job_get_many(store: Store, job_ids: Sequence[str]) -> list[Job | None]:
    if _batches(store):
        return await cast(JobBatchStore, store).job_get_many(job_ids)
    return [await store.job_get(job_id) for job_id in job_ids]


async def job_claim(store: Store, queue: str, *, now_ms: int, count: int, take: Take) -> list[Job]:
    """:meth:`JobBatchStore.job_claim`, or candidates and compare-and-set for other stores:
    a candidate another claimer changed first is passed over."""
    if _batches(store):
        batch = cast(JobBatchStore, store)
        return await batch.job_claim(queue, now_ms=now_ms, count=count, take=take)
    # A few more than asked: another claimer may take some of them first.
    candidates = await store.job_candidates(queue, now_ms=now_ms, limit=count + 15)
    stored: list[Job] = []
    running = 0
    for candidate in candidates:
        if running == count:
            break
        changed = take(candidate)
        if changed is not None and await store.job_update(changed):
            stored.append(changed)
            running += changed.state is JobState.RUNNING
    return stored


async def job_change_many(store: Store, job_ids: Sequence[str], change: Change) -> list[Job | None]:
    """:meth:`JobBatchStore.job_change_many`, or read and compare-and-set for other stores,
    reading again the items that changed meanwhile (up to :data:`CAS_ATTEMPTS` times)."""
    if _batches(store):
        return await cast(JobBatchStore, store).job_change_many(job_ids, change)
    out: list[Job | None] = [None] * len(job_ids)
    pending = list(range(len(job_ids)))
    for _ in range(CAS_ATTEMPTS):
        if not pending:
            break
        retry: list[int] = []
        for i in pending:  # one at a time: an id may come twice
            changed = change(i, await store.job_get(job_ids[i]))
            if changed is None:
                continue
            if await store.job_update(changed):
                out[i] = changed
            else:
                retry.append(i)
        pending = retry
    return out  # an item still pending kept changing: nothing stored for it
