"""Jobs from the client's side: :class:`Job` (a snapshot) and handles to watch one.

``client.submit(queue, payload)`` returns a :class:`JobHandle` (``AsyncJobHandle`` from
:class:`~.aio.AsyncClient`): ``status()`` short-polls, ``wait()`` long-polls until the job
finishes, ``result()`` waits and returns the result (or raises :class:`JobFailed`),
``progress()`` yields each new version as it happens, ``cancel()`` cancels.

Many jobs: ``client.submit_many(queue, payloads)`` returns handles from one request per
thousand jobs, and ``client.as_finished(handles)`` / ``client.wait_all(handles)`` follow them
all over one event stream (:class:`Watching` holds what the twins share). Workers report many
jobs at once with ``client.finish_many(queue, [Completion(job, result), Failure(job, error)])``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .errors import ClientError, HubError, HubUnreachable, ProtocolViolation
from .resilience import Resilience, is_retryable

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .sync import Client

FINISHED = frozenset({"succeeded", "cancelled", "dead"})
#: Seconds a single long poll of a job lasts; waits longer than that poll again.
POLL_WAIT = 30.0


class JobFailed(ClientError):
    """The job ended without a result: dead (attempts used up, or given up) or cancelled."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(f"job {job.id} ended {job.state}: {job.error or 'no error given'}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    id: str
    queue: str
    state: str
    attempts: int
    max_attempts: int
    version: int
    payload: Any
    progress: Any
    result: Any
    error: str | None
    cancel_requested: bool
    created: str
    updated: str
    lease: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @classmethod
    def from_document(cls, document: Any) -> Job:
        try:
            return cls(
                id=document["id"],
                queue=document["queue"],
                state=document["state"],
                attempts=document["attempts"],
                max_attempts=document["max_attempts"],
                version=document["version"],
                payload=document["payload"],
                progress=document["progress"],
                result=document["result"],
                error=document["error"],
                cancel_requested=document["cancel_requested"],
                created=document["created"],
                updated=document["updated"],
                lease=document.get("lease"),
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolViolation(f"not a job: {str(document)[:200]}") from exc


@dataclass(frozen=True, slots=True)
class Completion:
    """A job a worker completed, with its result (any JSON value)."""

    job: Job
    result: Any


@dataclass(frozen=True, slots=True)
class Failure:
    """A job a worker failed: retried while attempts are left, unless ``retry`` is False."""

    job: Job
    error: str
    retry: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """The hub's answer for one job of :meth:`~.sync.Client.finish_many`: the job's new state
    and version, or the error that refused the item (``lease-lost``, ``job-not-found``...)."""

    id: str | None
    state: str | None = None
    version: int | None = None
    error: HubError | None = None


class JobBatchError(ClientError):
    """Some jobs of a batch submit were refused. ``handles`` has a handle for each payload that
    was accepted and None for each refused one; ``errors`` maps the index of each refused
    payload to the hub's refusal."""

    def __init__(self, handles: list[Any], errors: dict[int, HubError]) -> None:
        self.handles = handles
        self.errors = errors
        first = min(errors)
        super().__init__(f"{len(errors)} of {len(handles)} jobs refused; #{first}: {errors[first]}")


class Watching:
    """What ``as_finished`` does between events, sync or async: which handles still wait, which
    ids the next stream asks for, and how long to wait before asking again after a failure.

    The hub's stream of many jobs sends a job that finished before the stream opened at once,
    and registers before it reads: a stream opened again with the ids still waiting misses
    nothing."""

    def __init__(self, handles: Any, resilience: Resilience, reconnect_limit: int | None) -> None:
        self.resilience = resilience
        self.reconnect_limit = reconnect_limit
        self.finished: list[Job] = []
        self.waiting: dict[str, list[Any]] = {}
        for handle in handles:
            if handle.last.finished:
                self.finished.append(handle.last)
            else:
                self.waiting.setdefault(handle.id, []).append(handle)
        self.asked: list[str] = []
        self.failures = 0

    def next_ids(self, size: int) -> list[str]:
        self.asked = list(self.waiting)[:size]
        return self.asked

    def event(self, kind: str, data: str) -> Job | None:
        """The job an event says has finished (its handles updated), or None."""
        document = _loads(data)
        if kind == "problem":
            raise HubError(404, document if isinstance(document, dict) else {})
        job = Job.from_document(document)
        self.failures = 0
        if not job.finished:
            return None
        handles = self.waiting.pop(job.id, None)
        if handles is None:
            return None
        for handle in handles:
            handle.last = job
        return job

    def ended(self) -> float:
        """The delay before the next stream: none once the ids asked for have all finished."""
        if not any(job_id in self.waiting for job_id in self.asked):
            return 0.0
        return self.failed(HubUnreachable("the hub ended the stream early (shutting down?)"))

    def failed(self, error: ClientError) -> float:
        """The delay before opening the stream again after ``error``; raises it when it is
        final (the hub refused the request, or it failed ``reconnect_limit`` times in a row)."""
        if not is_retryable(error):
            raise error
        self.failures += 1
        if self.reconnect_limit is not None and self.failures > self.reconnect_limit:
            raise error
        return self.resilience.retry.delay(self.failures, error, self.resilience.rand)


def _loads(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(f"the hub sent an event that is not JSON: {exc}") from None


def outcome(job: Job) -> Any:
    if job.state != "succeeded":
        raise JobFailed(job)
    return job.result


class JobHandle:
    def __init__(self, client: Client, job: Job) -> None:
        self.client = client
        self.id = job.id
        self.last = job

    def status(self) -> Job:
        self.last = self.client.job(self.id)
        return self.last

    def wait(self, timeout: float | None = None) -> Job:
        """The job once it has finished, or as it is after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.last
        while not job.finished:
            left = POLL_WAIT if deadline is None else min(POLL_WAIT, deadline - time.monotonic())
            if left <= 0:
                break
            job = self.client.job(self.id, wait=left, version=job.version)
        self.last = job
        return job

    def result(self, timeout: float | None = None) -> Any:
        """The result, once the job succeeded; :class:`JobFailed` if it did not."""
        job = self.wait(timeout)
        if not job.finished:
            raise TimeoutError(f"job {self.id} has not finished after {timeout} s")
        return outcome(job)

    def progress(self) -> Iterator[Job]:
        """Each new version of the job, until and including the final one."""
        job = self.last
        yield job
        while not job.finished:
            newer = self.client.job(self.id, wait=POLL_WAIT, version=job.version)
            if newer.version > job.version:
                yield newer
            job = newer
        self.last = job

    def cancel(self) -> Job:
        self.last = self.client.cancel(self.id)
        return self.last


class AsyncJobHandle:
    def __init__(self, client: AsyncClient, job: Job) -> None:
        self.client = client
        self.id = job.id
        self.last = job

    async def status(self) -> Job:
        self.last = await self.client.job(self.id)
        return self.last

    async def wait(self, timeout: float | None = None) -> Job:  # noqa: ASYNC109 - the twin's API
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        job = self.last
        while not job.finished:
            left = POLL_WAIT if deadline is None else min(POLL_WAIT, deadline - loop.time())
            if left <= 0:
                break
            job = await self.client.job(self.id, wait=left, version=job.version)
        self.last = job
        return job

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        job = await self.wait(timeout)
        if not job.finished:
            raise TimeoutError(f"job {self.id} has not finished after {timeout} s")
        return outcome(job)

    async def progress(self) -> AsyncIterator[Job]:
        job = self.last
        yield job
        while not job.finished:
            newer = await self.client.job(self.id, wait=POLL_WAIT, version=job.version)
            if newer.version > job.version:
                yield newer
            job = newer
        self.last = job

    async def cancel(self) -> Job:
        self.last = await self.client.cancel(self.id)
        return self.last
