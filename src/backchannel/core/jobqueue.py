"""The job service: submitting, watching, claiming and finishing jobs, over the store.

Every change is a transition of :mod:`.jobs` applied with the store's compare-and-set: read the
job, compute its next version, store it if nobody changed it meanwhile, else read again. So two
workers (or two hub processes) can never both claim a job, and a result from a worker whose
lease has run out is refused.

Waiting is local to the process, like long polls of channels: a long poll of a job wakes when
the store reports a new version of it; a claim waiting on a queue wakes when a job of that queue
is queued. A sweeper puts back jobs whose lease expired (the worker died) and deletes finished
jobs after their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from . import jobs
from .channels import validate_channel
from .errors import InvalidRequest, TooBusy
from .hub import check_idempotency_key
from .jobs import Job, JobNotFound, JobState
from .store import Store

log = logging.getLogger("backchannel.jobs")

#: How often the sweeper looks for expired leases, and deletes finished jobs, in seconds.
SWEEP_EVERY = 1.0
TRIM_EVERY = 60.0
CAS_ATTEMPTS = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class JobLimits:
    max_payload_bytes: int = 1 << 20
    default_attempts: int = 3
    default_lease: float = 30.0
    max_lease: float = 600.0
    max_wait: float = 60.0
    retention: float = 86_400.0
    max_waiting: int = 10_000


class JobQueue:
    def __init__(
        self, store: Store, *, limits: JobLimits | None = None, now_ms: Callable[[], int]
    ) -> None:
        self.store = store
        self.limits = limits or JobLimits()
        self._now_ms = now_ms
        self._job_waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._queue_waiters: dict[str, set[asyncio.Future[None]]] = {}
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
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        if len(payload) > self.limits.max_payload_bytes:
            raise InvalidRequest(
                "message-too-large",
                f"the payload is larger than {self.limits.max_payload_bytes} bytes",
            )
        now = self._now_ms()
        attempts = self.limits.default_attempts if max_attempts is None else max_attempts
        job = jobs.submitted(queue, payload, attempts, now)
        return await self.store.job_create(job, idempotency_key=idempotency_key, now_ms=now)

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
        validate_channel(queue)
        wait = self._capped(wait)
        lease_ms = self._lease_ms(lease)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with self._counted():
            while True:
                woken = self._register(self._queue_waiters, queue)
                try:
                    taken = await self._take(queue, lease_ms)
                    remaining = deadline - loop.time()
                    if taken is not None or remaining <= 0 or self._closing:
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

    async def _take(self, queue: str, lease_ms: int) -> Job | None:
        now = self._now_ms()
        for candidate in await self.store.job_candidates(queue, now_ms=now, limit=16):
            job = candidate
            if job.state is JobState.RUNNING:  # its lease expired: back to the queue first
                back = jobs.expired(job, now)
                if back is None or back.state is not JobState.QUEUED:
                    if back is not None:
                        await self.store.job_update(back)  # dead, or cancelled
                    continue
                job = back
                taken = jobs.claimed(job, now, lease_ms)
                # Both steps in one stored version: nobody else sees it queued in between.
                taken = _squash(candidate, taken)
            else:
                taken = jobs.claimed(job, now, lease_ms)
            if await self.store.job_update(taken):
                return taken
        return None

    async def heartbeat(self, job_id: str, lease: str, extend: float | None = None) -> Job:
        lease_ms = self._lease_ms(extend)
        return await self._change(job_id, lambda j, now: jobs.heartbeat(j, lease, now, lease_ms))

    async def progress(self, job_id: str, lease: str, progress: bytes) -> Job:
        return await self._change(job_id, lambda j, now: jobs.progressed(j, lease, progress, now))

    async def complete(self, job_id: str, lease: str, result: bytes) -> Job:
        return await self._change(job_id, lambda j, now: jobs.completed(j, lease, result, now))

    async def fail(self, job_id: str, lease: str, error: str, *, retry: bool = True) -> Job:
        return await self._change(job_id, lambda j, now: jobs.failed(j, lease, error, retry, now))

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
