"""Jobs: work submitted to a queue, claimed by workers under a lease, finished with a result.

This module is the job's life, as pure functions from one :class:`Job` to the next; the
:class:`~backchannel.core.jobqueue.JobQueue` applies them through the store, which keeps each
job with a ``version`` so that two hub processes never both apply a change to the same version
(compare-and-set).

::

    queued ──claim──▶ running ──complete──▶ succeeded
      ▲                 │ │ └──fail(retry) / lease expired──▶ queued (or dead, attempts used up)
      │                 │ └───fail(no retry)──────────────▶ dead
      └─────────────────┘
    queued ──cancel──▶ cancelled        running ──cancel──▶ running, cancel_requested
                                        (the worker learns it from its next heartbeat, and
                                         completing or failing then ends the job as cancelled)

A claim hands the worker a lease token; every later call of that worker names it. A worker
whose lease expired (the job went back to the queue, or to another worker) is told so
(:class:`LeaseLost`) and its result is not taken: the job runs at least once, and a finished job
never runs again.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import BackchannelError, InvalidRequest

MAX_ERROR_LENGTH = 4000
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    DEAD = "dead"

    #: A final state: nothing changes the job any more. (Set on each member below: a plain
    #: attribute, read for every job of every batch, rather than a property.)
    finished: bool


for _state in JobState:
    _state.finished = _state in (JobState.SUCCEEDED, JobState.CANCELLED, JobState.DEAD)


class JobNotFound(BackchannelError):
    kind = "job-not-found"


class LeaseLost(BackchannelError):
    """The worker's lease is not (or no longer) the job's: it expired, or the job finished."""

    kind = "lease-lost"


class JobFinished(BackchannelError):
    kind = "job-finished"


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    id: str
    queue: str
    state: JobState
    payload: bytes  # JSON, as submitted
    attempts: int
    max_attempts: int
    created_ms: int
    updated_ms: int
    version: int = 1
    progress: bytes | None = None  # JSON
    result: bytes | None = None  # JSON
    error: str | None = None
    lease: str | None = None
    lease_expires_ms: int | None = None
    cancel_requested: bool = False


_last_id_ms = -1
_id_seq = 0


def new_job_id(now_ms: int) -> str:
    """32 hex digits: the time in milliseconds (12), a count of the ids this process made in
    that millisecond (4), then 64 random bits. Ids made later by one process sort later, within
    a millisecond too: a store's index of ids grows at one end, and a store that breaks ties
    of ``created_ms`` by id (Redis) hands out jobs submitted together in submission order."""
    global _last_id_ms, _id_seq
    if now_ms == _last_id_ms:
        _id_seq = (_id_seq + 1) & 0xFFFF
    else:
        _last_id_ms, _id_seq = now_ms, 0
    return f"{now_ms & 0xFFFFFFFFFFFF:012x}{_id_seq:04x}{os.urandom(8).hex()}"


def valid_job_id(job_id: str) -> bool:
    return _JOB_ID.fullmatch(job_id) is not None


def check_job_id(job_id: str) -> str:
    if _JOB_ID.fullmatch(job_id) is None:
        raise JobNotFound(f"there is no job {job_id[:40]!r}")
    return job_id


def submitted(queue: str, payload: bytes, max_attempts: int, now_ms: int) -> Job:
    if not 1 <= max_attempts <= 100:
        raise InvalidRequest("invalid-job", "max_attempts must be between 1 and 100")
    return Job(
        id=new_job_id(now_ms),
        queue=queue,
        state=JobState.QUEUED,
        payload=payload,
        attempts=0,
        max_attempts=max_attempts,
        created_ms=now_ms,
        updated_ms=now_ms,
    )


def _next(job: Job, now_ms: int, **changes: Any) -> Job:
    """The job's next version, with ``changes`` (names of fields that change).

    Spelled out rather than ``dataclasses.replace``: a batch makes thousands of these, and
    this is a third of the cost."""
    assert changes.keys() <= _CHANGEABLE, changes.keys() - _CHANGEABLE
    get = changes.get
    return Job(
        id=job.id,
        queue=job.queue,
        state=get("state", job.state),
        payload=job.payload,
        attempts=get("attempts", job.attempts),
        max_attempts=job.max_attempts,
        created_ms=job.created_ms,
        updated_ms=now_ms,
        version=job.version + 1,
        progress=get("progress", job.progress),
        result=get("result", job.result),
        error=get("error", job.error),
        lease=get("lease", job.lease),
        lease_expires_ms=get("lease_expires_ms", job.lease_expires_ms),
        cancel_requested=get("cancel_requested", job.cancel_requested),
    )


_CHANGEABLE = frozenset(
    {"state", "attempts", "progress", "result", "error", "lease", "lease_expires_ms"}
    | {"cancel_requested"}
)


def new_leases(count: int) -> Iterator[str]:
    """``count`` new lease tokens, from one read of the system's random source."""
    pool = os.urandom(16 * count).hex()
    return (pool[i : i + 32] for i in range(0, len(pool), 32))


def claimed(job: Job, now_ms: int, lease_ms: int, *, lease: str | None = None) -> Job:
    """A queued job taken by a worker, under ``lease`` (a new token if None)."""
    assert job.state is JobState.QUEUED
    return _next(
        job,
        now_ms,
        state=JobState.RUNNING,
        attempts=job.attempts + 1,
        lease=lease or secrets.token_hex(16),
        lease_expires_ms=now_ms + lease_ms,
    )


def _leased(job: Job, lease: str, now_ms: int) -> None:
    if (
        job.state is not JobState.RUNNING
        or job.lease != lease
        or job.lease_expires_ms is None
        or job.lease_expires_ms <= now_ms
    ):
        raise LeaseLost(f"job {job.id} is not running under this lease any more")


def _given_up(job: Job, now_ms: int, error: str) -> Job:
    """Back to the queue for another attempt, or dead when the attempts are used up."""
    if job.cancel_requested:
        return _finish(job, now_ms, JobState.CANCELLED, error=error)
    if job.attempts >= job.max_attempts:
        return _finish(job, now_ms, JobState.DEAD, error=error)
    return _next(job, now_ms, state=JobState.QUEUED, lease=None, lease_expires_ms=None, error=error)


def _finish(job: Job, now_ms: int, state: JobState, **changes: object) -> Job:
    return _next(job, now_ms, state=state, lease=None, lease_expires_ms=None, **changes)


def expired(job: Job, now_ms: int) -> Job | None:
    """The job after its lease ran out, or None if it has not."""
    if job.state is not JobState.RUNNING or job.lease_expires_ms is None:
        return None
    if job.lease_expires_ms > now_ms:
        return None
    return _given_up(job, now_ms, f"the lease of attempt {job.attempts} expired")


def heartbeat(job: Job, lease: str, now_ms: int, lease_ms: int) -> Job:
    _leased(job, lease, now_ms)
    return _next(job, now_ms, lease_expires_ms=now_ms + lease_ms)


def progressed(job: Job, lease: str, progress: bytes, now_ms: int) -> Job:
    _leased(job, lease, now_ms)
    return _next(job, now_ms, progress=progress)


def completed(job: Job, lease: str, result: bytes, now_ms: int) -> Job:
    _leased(job, lease, now_ms)
    if job.cancel_requested:
        return _finish(job, now_ms, JobState.CANCELLED, result=result)
    return _finish(job, now_ms, JobState.SUCCEEDED, result=result)


def failed(job: Job, lease: str, error: str, retry: bool, now_ms: int) -> Job:
    _leased(job, lease, now_ms)
    error = error[:MAX_ERROR_LENGTH]
    if not retry:
        state = JobState.CANCELLED if job.cancel_requested else JobState.DEAD
        return _finish(job, now_ms, state, error=error)
    return _given_up(job, now_ms, error)


def cancelled(job: Job, now_ms: int) -> Job:
    """Cancel: a queued job never runs; a running one is asked to stop."""
    if job.state.finished:
        raise JobFinished(f"job {job.id} has already finished ({job.state.value})")
    if job.state is JobState.QUEUED:
        return _finish(job, now_ms, JobState.CANCELLED)
    if job.cancel_requested:
        return job
    return _next(job, now_ms, cancel_requested=True)
