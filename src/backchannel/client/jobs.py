"""Jobs from the client's side: :class:`Job` (a snapshot) and handles to watch one.

``client.submit(queue, payload)`` returns a :class:`JobHandle` (``AsyncJobHandle`` from
:class:`~.aio.AsyncClient`): ``status()`` short-polls, ``wait()`` long-polls until the job
finishes, ``result()`` waits and returns the result (or raises :class:`JobFailed`),
``progress()`` yields each new version as it happens, ``cancel()`` cancels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ClientError, ProtocolViolation

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
