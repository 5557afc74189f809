"""The job service: submitting, watching, claiming and finishing jobs, over the store.

Every change is a transition of :mod:`.jobs` applied with the store's compare-and-set: read the
job, compute its next version, store it if nobody changed it meanwhile, else read again. So two
workers (or two hub processes) can never both claim a job, and a result from a worker whose
lease has run out is refused.

Waiting is local to the process, like long polls of channels: a long poll of a job wakes when
the store reports a new version of it; a claim waiting on a queue wakes when a job of that queue
is queued; a :class:`JobWatch` (the event stream of many jobs) hears every new version of the
jobs it watches. A sweeper puts back jobs whose lease expired (the worker died) and deletes
finished jobs after their retention.

Batches (:meth:`JobQueue.submit_many`, :meth:`JobQueue.claim_many`,
:meth:`JobQueue.finish_many`) apply the same transitions as the single calls, through the
store's batch methods (one transaction on SQLite). Each item succeeds or fails on its own: the
answer is a list with a job or the error of each item, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from . import jobs
from .channels import validate_channel
from .errors import BackchannelError, InvalidRequest, TooBusy
from .hub import check_idempotency_key
from .jobs import Job, JobNotFound, JobState
from .store import CAS_ATTEMPTS, Store, job_change_many, job_claim, job_create_many, job_get_many

log = logging.getLogger("backchannel.jobs")

#: How often the sweeper looks for expired leases, and deletes finished jobs, in seconds.
SWEEP_EVERY = 1.0
TRIM_EVERY = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobLimits:
    max_payload_bytes: int = 1 << 20
    default_attempts: int = 3
    default_lease: float = 30.0
    max_lease: float = 600.0
    max_wait: float = 60.0
    retention: float = 86_400.0
    max_waiting: int = 10_000
    max_batch: int = 1000  # jobs in one batch submit, claim or finish
    max_watch: int = 10_000  # jobs one JobWatch (event stream) follows


@dataclass(frozen=True, slots=True, kw_only=True)
class NewJob:
    """One job of a batch submit."""

    payload: bytes
    idempotency_key: str | None = None
    max_attempts: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How a worker ended one job of a batch: completed with ``result`` when it is not None,
    else failed with ``error``."""

    job_id: str
    lease: str
    result: bytes | None = None
    error: str = ""
    retry: bool = True

    def apply(self, job: Job, now_ms: int) -> Job:
        if self.result is not None:
            return jobs.completed(job, self.lease, self.result, now_ms)
        return jobs.failed(job, self.lease, self.error, self.retry, now_ms)


#: Per item of a batch: what the single call would have returned, or the error it raised.
Submitted = tuple[Job, bool] | BackchannelError
Finished = Job | BackchannelError


class JobQueue:
    def __init__(
        self, store: Store, *, limits: JobLimits | None = None, now_ms: Callable[[], int]
    ) -> None:
        self.store = store
        self.limits = limits or JobLimits()
        self._now_ms = now_ms
        self._job_waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._queue_waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._watches: dict[str, set[JobWatch]] = {}
        self._waiting = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self.store.add_job_listener(self._on_changed)
        self.store.add_resync_listener(self._on_resync)
        self._closing = False
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self) -> None:
        """Answer every waiting long poll and claim now."""
        self._closing = True
        for waiters in (*self._job_waiters.values(), *self._queue_waiters.values()):
            for future in waiters:
                if not future.done():
                    future.set_result(None)
        for watches in self._watches.values():
            for watch in watches:
                watch.wake()

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    # -- clients ------------------------------------------------------------------------------

    async def submit(
        self,
        queue: str,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> tuple[Job, bool]:
        validate_channel(queue)  # queue names follow the channel name rules
        now = self._now_ms()
        job = self._new(queue, NewJob(payload=payload, max_attempts=max_attempts), now)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        return await self.store.job_create(job, idempotency_key=idempotency_key, now_ms=now)

    async def submit_many(self, queue: str, items: Sequence[NewJob]) -> list[Submitted]:
        """Submit each item, in one store batch: per item, ``(job, replayed)`` as
        :meth:`submit` returns, or the error that refused it."""
        validate_channel(queue)
        self._check_batch(len(items))
        now = self._now_ms()
        out: list[Submitted | None] = [None] * len(items)
        todo: list[tuple[int, Job, str | None]] = []
        for i, item in enumerate(items):
            try:
                job = self._new(queue, item, now)
                if item.idempotency_key is not None:
                    check_idempotency_key(item.idempotency_key)
            except BackchannelError as exc:
                out[i] = exc
            else:
                todo.append((i, job, item.idempotency_key))
        made = await job_create_many(self.store, [(job, key) for _, job, key in todo], now_ms=now)
        for (i, _, _), done in zip(todo, made, strict=True):
            out[i] = done
        return [item for item in out if item is not None]

    def _new(self, queue: str, item: NewJob, now: int) -> Job:
        if len(item.payload) > self.limits.max_payload_bytes:
            raise InvalidRequest(
                "message-too-large",
                f"the payload is larger than {self.limits.max_payload_bytes} bytes",
            )
        attempts = self.limits.default_attempts if item.max_attempts is None else item.max_attempts
        return jobs.submitted(queue, item.payload, attempts, now)

    def _check_batch(self, size: int) -> None:
        if size > self.limits.max_batch:
            raise InvalidRequest(
                "batch-too-large",
                f"{size} items in one batch; at most {self.limits.max_batch} (job_max_batch)",
            )

    async def get(self, job_id: str) -> Job:
        found = await self.store.job_get(jobs.check_job_id(job_id))
        if found is None:
            raise JobNotFound(f"there is no job {job_id} (or it finished long ago)")
        return found

    async def wait(self, job_id: str, *, seen: int | None, seconds: float) -> Job:
        """The job once its version passes ``seen`` (its current one if None), or as it is
        when ``seconds`` have passed (a long poll, shortened to ``max_wait``)."""
        return await self.watch(job_id, seen=seen, seconds=self._capped(seconds))

    async def watch(self, job_id: str, *, seen: int | None, seconds: float) -> Job:
        """:meth:`wait` without its bound, for a stream that waits in turns of ``seconds``."""
        timeout = seconds
        job = await self.get(job_id)
        seen = job.version if seen is None else seen
        if job.version > seen or job.state.finished or timeout == 0:
            return job
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._counted():
            while True:
                woken = self._register(self._job_waiters, job_id)
                try:
                    job = await self.get(job_id)
                    remaining = deadline - loop.time()
                    if job.version > seen or job.state.finished or remaining <= 0:
                        return job
                    if self._closing:
                        return job
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await woken
                finally:
                    self._unregister(self._job_waiters, job_id, woken)

    async def cancel(self, job_id: str) -> Job:
        return await self._change(job_id, lambda job, now: jobs.cancelled(job, now))

    # -- workers ------------------------------------------------------------------------------

    async def claim(self, queue: str, *, wait: float, lease: float | None = None) -> Job | None:
        """The oldest job of ``queue`` a worker may take, now leased to it; waiting up to
        ``wait`` seconds for one. None when none came."""
        taken = await self.claim_many(queue, count=1, wait=wait, lease=lease)
        return taken[0] if taken else None

    async def claim_many(
        self, queue: str, *, count: int, wait: float, lease: float | None = None
    ) -> list[Job]:
        """Up to ``count`` of the oldest jobs of ``queue``, each leased to the caller; waiting
        up to ``wait`` seconds for the first. Empty when none came."""
        validate_channel(queue)
        if count < 1:
            raise InvalidRequest("invalid-parameter", "a claim takes at least one job")
        self._check_batch(count)
        wait = self._capped(wait)
        lease_ms = self._lease_ms(lease)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with self._counted():
            while True:
                woken = self._register(self._queue_waiters, queue)
                try:
                    taken = await self._take(queue, lease_ms, count)
                    remaining = deadline - loop.time()
                    if taken or remaining <= 0 or self._closing:
                        return taken
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await woken
                except BaseException:
                    self._unregister(self._queue_waiters, queue, woken)
                    if woken.done() and not woken.cancelled():
                        # Leaving (the client went away) with a wake-up meant for a job we
                        # will not take: hand it to another claimer.
                        self._wake_one(queue)
                    raise
                finally:
                    self._unregister(self._queue_waiters, queue, woken)

    async def _take(self, queue: str, lease_ms: int, count: int) -> list[Job]:
        now = self._now_ms()
        leases = jobs.new_leases(count)

        def take(candidate: Job) -> Job | None:
            if candidate.state is not JobState.RUNNING:
                return jobs.claimed(candidate, now, lease_ms, lease=next(leases, None))
            # Its lease expired: back to the queue first (or dead, or cancelled).
            back = jobs.expired(candidate, now)
            if back is None or back.state is not JobState.QUEUED:
                return back
            # Both steps in one stored version: nobody else sees it queued in between.
            return _squash(candidate, jobs.claimed(back, now, lease_ms, lease=next(leases, None)))

        stored = await job_claim(self.store, queue, now_ms=now, count=count, take=take)
        return [job for job in stored if job.state is JobState.RUNNING]

    async def heartbeat(self, job_id: str, lease: str, extend: float | None = None) -> Job:
        lease_ms = self._lease_ms(extend)
        return await self._change(job_id, lambda j, now: jobs.heartbeat(j, lease, now, lease_ms))

    async def progress(self, job_id: str, lease: str, progress: bytes) -> Job:
        return await self._change(job_id, lambda j, now: jobs.progressed(j, lease, progress, now))

    async def complete(self, job_id: str, lease: str, result: bytes) -> Job:
        return await self._change(job_id, lambda j, now: jobs.completed(j, lease, result, now))

    async def fail(self, job_id: str, lease: str, error: str, *, retry: bool = True) -> Job:
        return await self._change(job_id, lambda j, now: jobs.failed(j, lease, error, retry, now))

    async def finish_many(self, queue: str, outcomes: Sequence[Outcome]) -> list[Finished]:
        """Complete or fail each job of ``queue``, in one store batch: per item, the job as
        :meth:`complete` or :meth:`fail` returns it, or the error that refused it."""
        self._check_batch(len(outcomes))
        now = self._now_ms()
        refused: dict[int, BackchannelError] = {}

        def change(i: int, job: Job | None) -> Job | None:
            refused.pop(i, None)
            if job is None or job.queue != queue:
                missing = outcomes[i].job_id[:40]
                refused[i] = JobNotFound(f"there is no job {missing!r} in queue {queue}")
                return None
            try:
                return outcomes[i].apply(job, now)
            except BackchannelError as exc:
                refused[i] = exc
                return None

        ids = [outcome.job_id for outcome in outcomes]
        stored = await job_change_many(self.store, ids, change)
        return [
            job
            if job is not None
            else refused.get(i) or TooBusy(f"job {ids[i]} kept changing under this request")
            for i, job in enumerate(stored)
        ]

    # -- watching many jobs -------------------------------------------------------------------

    def _check_watch(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            raise InvalidRequest("invalid-job", "name at least one job to watch")
        if len(job_ids) > self.limits.max_watch:
            raise InvalidRequest(
                "batch-too-large",
                f"{len(job_ids)} jobs in one watch; at most {self.limits.max_watch} "
                "(job_max_watch)",
            )

    async def get_many(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs of a watch that exist now (ids that are malformed or name no job are left
        out), e.g. to check who may read them before watching."""
        self._check_watch(job_ids)
        valid = [job_id for job_id in dict.fromkeys(job_ids) if jobs.valid_job_id(job_id)]
        return [job for job in await job_get_many(self.store, valid) if job is not None]

    @contextlib.asynccontextmanager
    async def watch_many(
        self, job_ids: Sequence[str], *, final_only: bool
    ) -> AsyncIterator[JobWatch]:
        """A :class:`JobWatch` of the jobs, registered before the jobs are read: a change
        stored at any moment is seen, by the read or by the watch."""
        self._check_watch(job_ids)
        watch = JobWatch(job_ids, final_only=final_only)
        with self._counted():
            for job_id in watch.ids:
                self._watches.setdefault(job_id, set()).add(watch)
            try:
                valid = [job_id for job_id in watch.ids if jobs.valid_job_id(job_id)]
                for job_id, job in zip(valid, await job_get_many(self.store, valid), strict=True):
                    if job is None:
                        watch.lost(job_id)
                    else:
                        watch.changed(job)
                for job_id in watch.ids:
                    if not jobs.valid_job_id(job_id):
                        watch.lost(job_id)
                yield watch
            finally:
                for job_id in watch.ids:
                    watches = self._watches.get(job_id)
                    if watches is not None:
                        watches.discard(watch)
                        if not watches:
                            del self._watches[job_id]

    # -- internals ----------------------------------------------------------------------------

    async def _change(self, job_id: str, step: Callable[[Job, int], Job]) -> Job:
        for _ in range(CAS_ATTEMPTS):
            job = await self.get(job_id)
            changed = step(job, self._now_ms())
            if changed is job or await self.store.job_update(changed):
                return changed
        raise TooBusy(f"job {job_id} kept changing under this request; try again")

    def _lease_ms(self, lease: float | None) -> int:
        seconds = self.limits.default_lease if lease is None else lease
        if not 1 <= seconds <= self.limits.max_lease:
            raise InvalidRequest(
                "invalid-job", f"a lease lasts between 1 and {self.limits.max_lease:g} seconds"
            )
        return int(seconds * 1000)

    def _capped(self, wait: float) -> float:
        """A job wait, shortened to ``max_wait``: clients that wait in rounds (handles, workers)
        do not know the hub's maximum, and a shorter round is harmless."""
        if wait < 0:
            raise InvalidRequest("wait-out-of-range", "wait must not be negative")
        return min(wait, self.limits.max_wait)

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        if self._waiting >= self.limits.max_waiting:
            raise TooBusy(f"{self._waiting} job long polls and claims are waiting; retry shortly")
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1

    @staticmethod
    def _register(table: dict[str, set[asyncio.Future[None]]], key: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        table.setdefault(key, set()).add(future)
        return future

    @staticmethod
    def _unregister(
        table: dict[str, set[asyncio.Future[None]]], key: str, future: asyncio.Future[None]
    ) -> None:
        waiters = table.get(key)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del table[key]

    def _on_changed(self, job: Job) -> None:
        for future in self._job_waiters.get(job.id, ()):
            if not future.done():
                future.set_result(None)
        for watch in self._watches.get(job.id, ()):
            watch.changed(job)
        if job.state is JobState.QUEUED:
            # One queued job, one claimer: waking them all would have all but one read the
            # store for nothing. A woken claimer that takes nothing passes the turn on.
            self._wake_one(job.queue)

    def _on_resync(self) -> None:
        """Job changes may have gone unheard: every long poll and claim looks at the store
        again (each goes back to waiting if nothing changed for it)."""
        for waiters in (*self._job_waiters.values(), *self._queue_waiters.values()):
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    def _wake_one(self, queue: str) -> None:
        for future in self._queue_waiters.get(queue, ()):
            if not future.done():
                future.set_result(None)
                return

    async def _sweep_forever(self) -> None:
        keep_ms = int(self.limits.retention * 1000)
        trimmed_at = 0
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                now = self._now_ms()
                for job in await self.store.job_expired(now_ms=now, limit=100):
                    back = jobs.expired(job, now)
                    if back is not None:
                        await self.store.job_update(back)
                if now - trimmed_at >= TRIM_EVERY * 1000:
                    trimmed_at = now
                    await self.store.job_trim(now_ms=now, keep_ms=keep_ms)
            except Exception:
                log.exception("the job sweeper failed; will try again")


def _squash(before: Job, after: Job) -> Job:
    """``after`` as the version right after ``before``, however many steps led to it."""
    return replace(after, version=before.version + 1)


class JobWatch:
    """Many jobs followed at once: :meth:`take` returns each job whose version is newer than
    the one last taken (only once it has finished, with ``final_only``); :meth:`wait` waits for
    one. Versions that come faster than they are taken are skipped: a job is taken as it is now.
    Ids with no job (never, or deleted) are in :attr:`missing`, once each."""

    def __init__(self, job_ids: Sequence[str], *, final_only: bool) -> None:
        self.ids = list(dict.fromkeys(job_ids))
        self.final_only = final_only
        self._taken: dict[str, int] = dict.fromkeys(self.ids, 0)
        self._unfinished = set(self.ids)
        self._ready: dict[str, Job] = {}
        self.missing: list[str] = []
        self._wake: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        """Every job has finished (and was taken) or is missing (and was taken)."""
        return not self._unfinished and not self._ready and not self.missing

    @property
    def ready(self) -> bool:
        """Something is waiting to be taken."""
        return bool(self._ready or self.missing)

    def changed(self, job: Job) -> None:
        if job.version <= self._taken.get(job.id, job.version):
            return
        if self.final_only and not job.state.finished:
            return
        ready = self._ready.get(job.id)
        if ready is None or ready.version < job.version:
            self._ready[job.id] = job
            self.wake()

    def lost(self, job_id: str) -> None:
        if job_id in self._unfinished:
            self._unfinished.discard(job_id)
            self.missing.append(job_id)
            self.wake()

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def take(self) -> list[Job]:
        ready = list(self._ready.values())
        self._ready.clear()
        for job in ready:
            self._taken[job.id] = job.version
            if job.state.finished:
                self._unfinished.discard(job.id)
        return ready

    def take_missing(self) -> list[str]:
        missing, self.missing = self.missing, []
        return missing

    async def wait(self, seconds: float) -> None:
        """Until something is ready to take (or :meth:`wake`), at most ``seconds``."""
        if self._ready or self.missing:
            return
        self._wake = asyncio.get_running_loop().create_future()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._wake
        finally:
            self._wake = None
