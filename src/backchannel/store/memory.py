"""A store in process memory, for tests and throwaway hubs. Nothing survives a restart."""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core.channels import Retention
from ..core.errors import IdempotencyKeyReused, Unavailable
from ..core.jobs import Job, JobState
from ..core.messages import Appended, ChannelStats, Draft, Message
from ..core.store import Change, JobListener, Listener, ResyncListener, Take
from .base import DEFAULT_IDEMPOTENCY_TTL_MS, DEFAULT_RETENTION


@dataclass
class _Channel:
    last_seq: int = 0
    max_count: int | None = None  # the channel's own limits; None follows the default
    max_age_ms: int | None = None
    # Retained messages form a contiguous run of sequence numbers, oldest first.
    messages: list[Message] = field(default_factory=list)
    keys: dict[str, tuple[Message, bytes, int]] = field(default_factory=dict)


class MemoryStore:
    def __init__(
        self,
        *,
        retention: Retention = DEFAULT_RETENTION,
        idempotency_ttl_ms: int = DEFAULT_IDEMPOTENCY_TTL_MS,
    ) -> None:
        self.default_retention = retention
        self.idempotency_ttl_ms = idempotency_ttl_ms
        self._channels: dict[str, _Channel] = {}
        self._listeners: list[Listener] = []
        self._job_listeners: list[JobListener] = []
        self._jobs: dict[str, Job] = {}
        self._stored: dict[str, int] = {}  # the order jobs were created in
        self._count = itertools.count()
        self._queues: dict[str, _Queue] = {}
        self._job_keys: dict[tuple[str, str], tuple[str, int]] = {}  # (queue, key): (id, expiry)
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def ping(self) -> None:
        self._check()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_resync_listener(self, listener: ResyncListener) -> None:
        """Never called: this store loses no notification."""

    def _check(self) -> None:
        if not self._open:
            raise Unavailable("the memory store is closed")

    def _policy(self, state: _Channel | None) -> Retention:
        if state is None:
            return self.default_retention
        return self.default_retention.override(state.max_count, state.max_age_ms)

    async def append(self, channel: str, draft: Draft, *, now_ms: int) -> Appended:
        self._check()
        state = self._channels.setdefault(channel, _Channel())
        key = draft.idempotency_key
        if key is not None:
            earlier = state.keys.get(key)
            if earlier is not None and earlier[2] > now_ms:
                message, digest, _ = earlier
                if digest != draft.digest:
                    raise IdempotencyKeyReused(
                        f"Idempotency-Key {key!r} was used for a different message"
                    )
                return Appended(message, replayed=True)
        last_time = state.messages[-1].time_ms if state.messages else 0
        state.last_seq += 1
        message = Message(
            channel=channel,
            seq=state.last_seq,
            time_ms=max(now_ms, last_time),
            content_type=draft.content_type,
            data=draft.data,
        )
        state.messages.append(message)
        excess = len(state.messages) - self._policy(state).max_count
        if excess > 0:
            del state.messages[:excess]
        if key is not None:
            state.keys[key] = (message, draft.digest, now_ms + self.idempotency_ttl_ms)
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.call_soon(listener, channel, [message])
        return Appended(message)

    def _live(self, state: _Channel, now_ms: int) -> list[Message]:
        policy = self._policy(state)
        oldest = now_ms - policy.max_age_ms
        messages = state.messages
        skip = max(0, len(messages) - policy.max_count)
        while skip < len(messages) and messages[skip].time_ms < oldest:
            skip += 1
        return messages[skip:]

    async def read(
        self, channel: str, *, after: int, limit: int, max_bytes: int, now_ms: int
    ) -> list[Message]:
        self._check()
        state = self._channels.get(channel)
        if state is None:
            return []
        live = self._live(state, now_ms)
        if not live:
            return []
        start = max(0, after + 1 - live[0].seq)
        out: list[Message] = []
        size = 0
        for message in live[start : start + limit]:
            size += len(message.data)
            if out and size > max_bytes:
                break
            out.append(message)
        return out

    async def stats(self, channel: str, *, now_ms: int) -> ChannelStats:
        self._check()
        state = self._channels.get(channel)
        if state is None:
            return ChannelStats(last_seq=0, first_seq=1, retained=0)
        live = self._live(state, now_ms)
        first = live[0].seq if live else state.last_seq + 1
        return ChannelStats(last_seq=state.last_seq, first_seq=first, retained=len(live))

    async def get_retention(self, channel: str) -> Retention:
        self._check()
        return self._policy(self._channels.get(channel))

    async def set_retention(
        self, channel: str, *, max_count: int | None, max_age_ms: int | None
    ) -> None:
        self._check()
        state = self._channels.setdefault(channel, _Channel())
        state.max_count = max_count
        state.max_age_ms = max_age_ms
        excess = len(state.messages) - self._policy(state).max_count
        if excess > 0:
            del state.messages[:excess]

    async def trim(self, *, now_ms: int) -> int:
        self._check()
        removed = 0
        for state in self._channels.values():
            live = self._live(state, now_ms)
            removed += len(state.messages) - len(live)
            state.messages = live
            state.keys = {k: v for k, v in state.keys.items() if v[2] > now_ms}
        return removed

    # -- jobs ---------------------------------------------------------------------------------

    def add_job_listener(self, listener: JobListener) -> None:
        self._job_listeners.append(listener)

    def _jobs_changed(self, changed: list[Job]) -> None:
        if changed and self._job_listeners:
            asyncio.get_running_loop().call_soon(self._tell, changed)

    def _tell(self, changed: list[Job]) -> None:
        for job in changed:
            for listener in self._job_listeners:
                listener(job)

    def _index(self, before: Job | None, job: Job) -> None:
        """Keep the queued and running indexes of ``job``'s queue in step with its state."""
        queue = self._queues.get(job.queue)
        if queue is None:
            queue = self._queues[job.queue] = _Queue()
        if before is not None:
            if before.state is JobState.QUEUED:
                if before.id in queue.fresh:
                    del queue.fresh[before.id]
                else:
                    queue.returned.remove(self._rank(before))
            elif before.state is JobState.RUNNING:
                queue.running.pop(before.id, None)
        if job.state is JobState.QUEUED:
            if before is None:
                queue.fresh[job.id] = None
            else:  # put back: it goes before newer jobs, by its creation time
                bisect.insort(queue.returned, self._rank(job))
        elif job.state is JobState.RUNNING:
            queue.running[job.id] = None

    def _rank(self, job: Job) -> tuple[int, int, str]:
        """Claim order: creation time, then the order jobs were stored in (a batch shares its
        millisecond)."""
        return (job.created_ms, self._stored[job.id], job.id)

    def _create(self, job: Job, idempotency_key: str | None, now_ms: int) -> tuple[Job, bool]:
        if idempotency_key is not None:
            earlier = self._job_keys.get((job.queue, idempotency_key))
            if earlier is not None and earlier[1] > now_ms and earlier[0] in self._jobs:
                return self._jobs[earlier[0]], True
            self._job_keys[(job.queue, idempotency_key)] = (
                job.id,
                now_ms + self.idempotency_ttl_ms,
            )
        self._jobs[job.id] = job
        self._stored[job.id] = next(self._count)
        self._index(None, job)
        return job, False

    def _update(self, job: Job) -> bool:
        stored = self._jobs.get(job.id)
        if stored is None or stored.version != job.version - 1:
            return False
        self._jobs[job.id] = job
        self._index(stored, job)
        return True

    async def job_create(
        self, job: Job, *, idempotency_key: str | None, now_ms: int
    ) -> tuple[Job, bool]:
        self._check()
        made = self._create(job, idempotency_key, now_ms)
        if not made[1]:
            self._jobs_changed([job])
        return made

    async def job_create_many(
        self, items: Sequence[tuple[Job, str | None]], *, now_ms: int
    ) -> list[tuple[Job, bool]]:
        self._check()
        made = [self._create(job, key, now_ms) for job, key in items]
        self._jobs_changed([job for job, replayed in made if not replayed])
        return made

    async def job_get(self, job_id: str) -> Job | None:
        self._check()
        return self._jobs.get(job_id)

    async def job_get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        self._check()
        return [self._jobs.get(job_id) for job_id in job_ids]

    async def job_update(self, job: Job) -> bool:
        self._check()
        if not self._update(job):
            return False
        self._jobs_changed([job])
        return True

    async def job_update_many(self, jobs: Sequence[Job]) -> list[bool]:
        self._check()
        done = [self._update(job) for job in jobs]
        self._jobs_changed([job for job, ok in zip(jobs, done, strict=True) if ok])
        return done

    async def job_claim(self, queue: str, *, now_ms: int, count: int, take: Take) -> list[Job]:
        self._check()
        stored: list[Job] = []
        running = 0
        for candidate in await self.job_candidates(queue, now_ms=now_ms, limit=count + 15):
            if running == count:
                break
            changed = take(candidate)
            if changed is not None and self._update(changed):
                stored.append(changed)
                running += changed.state is JobState.RUNNING
        self._jobs_changed(stored)
        return stored

    async def job_change_many(self, job_ids: Sequence[str], change: Change) -> list[Job | None]:
        self._check()
        out: list[Job | None] = []
        for i, job_id in enumerate(job_ids):
            changed = change(i, self._jobs.get(job_id))
            out.append(changed if changed is not None and self._update(changed) else None)
        self._jobs_changed([job for job in out if job is not None])
        return out

    async def job_candidates(self, queue: str, *, now_ms: int, limit: int) -> list[Job]:
        self._check()
        state = self._queues.get(queue)
        if state is None:
            return []
        jobs = self._jobs
        # Fresh jobs are in submission order; jobs put back are merged in by creation time.
        found = [jobs[job_id] for job_id in itertools.islice(state.fresh, limit)]
        if state.returned:
            found += [jobs[job_id] for _, _, job_id in state.returned[:limit]]
            found.sort(key=self._rank)
            del found[limit:]
        if len(found) < limit:
            expired = [
                job for job in map(jobs.__getitem__, state.running) if _lease_expired(job, now_ms)
            ]
            expired.sort(key=self._rank)
            found += expired[: limit - len(found)]
        return found

    async def job_expired(self, *, now_ms: int, limit: int) -> list[Job]:
        self._check()
        expired = [
            job
            for state in self._queues.values()
            for job in map(self._jobs.__getitem__, state.running)
            if _lease_expired(job, now_ms)
        ]
        return expired[:limit]

    async def job_trim(self, *, now_ms: int, keep_ms: int) -> int:
        self._check()
        old = [
            job.id
            for job in self._jobs.values()
            if job.state.finished and job.updated_ms < now_ms - keep_ms
        ]
        for job_id in old:
            del self._jobs[job_id]
            del self._stored[job_id]
        self._job_keys = {k: v for k, v in self._job_keys.items() if v[1] > now_ms}
        return len(old)


@dataclass
class _Queue:
    """The unfinished jobs of one queue: what claims and the sweeper look at, so that finished
    jobs piling up cost them nothing."""

    fresh: OrderedDict[str, None] = field(default_factory=OrderedDict)  # never claimed, in order
    returned: list[tuple[int, int, str]] = field(default_factory=list)  # put back, by rank
    running: dict[str, None] = field(default_factory=dict)


def _lease_expired(job: Job, now_ms: int) -> bool:
    return (
        job.state is JobState.RUNNING
        and job.lease_expires_ms is not None
        and job.lease_expires_ms <= now_ms
    )
