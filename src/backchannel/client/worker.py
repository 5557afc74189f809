"""Workers: run a Python function for every job of a queue.

::

    worker = Worker("http://127.0.0.1:8000", concurrency=4)

    @worker.task("video")
    def transcode(payload, job):
        job.progress(0.5)
        return {"url": ...}

    worker.run()  # until SIGTERM or Ctrl-C, then finishes the jobs it holds

Each thread claims a job (with a lease), runs the function while a heartbeat keeps the lease
alive, then completes the job with what the function returned, or fails it with the exception
(the hub retries it up to its attempts). A function that takes a second argument receives a
:class:`JobContext`, to report progress and to see whether the job was cancelled.
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from ._base import Token
from .errors import ClientError, HubError
from .jobs import Job
from .sync import Client

log = logging.getLogger("backchannel.worker")

#: Seconds a claim waits for a job before it looks at whether the worker is stopping.
CLAIM_WAIT = 5.0

Task = Callable[..., Any]


class JobContext:
    """What a task may know and do about the job it runs."""

    def __init__(self, client: Client, job: Job, lease: float) -> None:
        self._client = client
        self._lease = lease
        self.job = job
        self.cancelled = False  # the job was cancelled: stop soon (it will end as cancelled)
        self.lost = False  # the lease is gone (the hub gave the job to someone else)

    def progress(self, value: Any) -> None:
        """Report progress: any JSON value."""
        try:
            self.job = self._client.report_progress(self.job, value)
        except ClientError as exc:
            self._note(exc)

    def heartbeat(self) -> None:
        try:
            # Renew for the worker's own lease, not the hub's default.
            self.job = self._client.heartbeat(self.job, extend=self._lease)
            self.cancelled = self.job.cancel_requested
        except ClientError as exc:
            self._note(exc)

    def _note(self, exc: ClientError) -> None:
        # The hub unreachable for a moment: the next heartbeat tries again within the lease.
        if isinstance(exc, HubError) and exc.slug == "lease-lost":
            self.lost = True
        else:
            log.warning("job %s: %s", self.job.id, exc)


class Worker:
    def __init__(
        self,
        url: str | None = None,
        *,
        concurrency: int = 1,
        lease: float = 30.0,
        client: Client | None = None,
        token: Token | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client = client or Client(url, token=token)
        self.concurrency = concurrency
        self.lease = lease
        self.tasks: dict[str, Task] = {}
        self.stopping = threading.Event()
        self.done = 0

    def task(self, queue: str) -> Callable[[Task], Task]:
        """Register the decorated function for the jobs of ``queue``."""

        def register(function: Task) -> Task:
            self.tasks[queue] = function
            return function

        return register

    def stop(self) -> None:
        """Take no new job; the ones running finish."""
        self.stopping.set()

    def run(self) -> None:
        """Work until :meth:`stop` (or SIGTERM / SIGINT in the main thread)."""
        if not self.tasks:
            raise ValueError("no task: register one with @worker.task(queue)")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop())
        threads = [
            threading.Thread(target=self._loop, args=(queue, function), daemon=True)
            for queue, function in self.tasks.items()
            for _ in range(self.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)

    def _loop(self, queue: str, function: Task) -> None:
        wants_context = len(inspect.signature(function).parameters) >= 2
        while not self.stopping.is_set():
            try:
                job = self.client.claim(queue, wait=CLAIM_WAIT, lease=self.lease)
            except ClientError as exc:
                log.warning("claim on %s failed: %s; retrying", queue, exc)
                self.stopping.wait(1.0)
                continue
            if job is not None:
                self._run(job, function, wants_context)

    def _run(self, job: Job, function: Task, wants_context: bool) -> None:
        context = JobContext(self.client, job, self.lease)
        beating = threading.Event()

        def beat() -> None:
            while not beating.wait(self.lease / 3):
                context.heartbeat()

        heart = threading.Thread(target=beat, daemon=True)
        heart.start()
        try:
            result = function(job.payload, context) if wants_context else function(job.payload)
        except Exception as exc:
            beating.set()
            log.warning("job %s failed: %r", job.id, exc)
            error = f"{type(exc).__name__}: {exc}"
            self._finish(lambda: self.client.fail(context.job, error))
        else:
            beating.set()
            try:
                self._finish(lambda: self.client.complete(context.job, result))
            except TypeError as exc:  # the result is not JSON: the task is at fault
                error = f"the task's result cannot be sent as JSON: {exc}"
                self._finish(lambda: self.client.fail(context.job, error, retry=False))
        heart.join()
        self.done += 1

    def _finish(self, call: Callable[[], Job]) -> None:
        try:
            call()
        except HubError as exc:
            if exc.slug != "lease-lost":  # lost: the job was given to another worker
                log.error("could not report a job's end: %s", exc)
        except ClientError as exc:
            log.error("could not report a job's end: %s", exc)
