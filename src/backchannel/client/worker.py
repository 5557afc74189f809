"""Workers: run a Python function for every job of a queue.

::

    worker = Worker("http://127.0.0.1:8000", concurrency=4)

    @worker.task("video")
    def transcode(payload, job):
        job.progress(0.5)
        return {"url": ...}

    worker.run()  # until SIGTERM or Ctrl-C, then finishes the jobs it holds

Per queue, one thread claims jobs in batches (``claim_many``: as many as there are idle task
threads, plus the prefetch), and ``concurrency`` threads run the function, one job each at a
time. One thread reports the ends of jobs to the hub: what is ready goes at once, in one
request (``finish_many``), so a lone job is reported as soon as it ends and a busy worker sends
one request for many jobs. Another keeps the leases of the jobs the worker holds alive with
heartbeats. A job whose function returned is completed with the result; one whose function
raised is failed with the exception (the hub retries it up to its attempts). A function that
takes a second argument receives a :class:`JobContext`, to report progress and to see whether
the job was cancelled.

The prefetch is how many jobs a queue's claimer may hold beyond its idle threads. By default
it follows the jobs: enough to keep the threads busy for one claim's round trip, from the
average time a job takes and a claim takes (so about none for jobs of a second or more, and up
to :data:`MAX_PREFETCH` for jobs of microseconds). A fixed ``prefetch`` replaces that.
"""

from __future__ import annotations

import inspect
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from ._base import BATCH_SIZE, Token
from .errors import ClientError, HubError
from .jobs import Completion, Failure, Job
from .sync import Client

log = logging.getLogger("backchannel.worker")

#: Seconds a claim waits for a job before it looks at whether the worker is stopping.
CLAIM_WAIT = 5.0
#: Ends of jobs reported in one request, at most.
REPORT_BATCH = 1000
#: The most jobs a claimer holds beyond its threads when the prefetch follows the jobs.
MAX_PREFETCH = 1000
#: Weight of the newest sample in the running averages of job and claim times.
SMOOTHING = 0.2

Task = Callable[..., Any]


class JobContext:
    """What a task may know and do about the job it runs."""

    def __init__(self, client: Client, job: Job, lease: float) -> None:
        self._client = client
        self._lease = lease
        self._lock = threading.Lock()  # the task and the lease keeper both renew
        self.job = job
        self.renewed = time.monotonic()
        self.cancelled = False  # the job was cancelled: stop soon (it will end as cancelled)
        self.lost = False  # the lease is gone (the hub gave the job to someone else)

    def progress(self, value: Any) -> None:
        """Report progress: any JSON value."""
        try:
            job = self._client.report_progress(self.job, value)
        except ClientError as exc:
            self._note(exc)
        else:
            with self._lock:
                self.job = job

    def heartbeat(self) -> None:
        try:
            # Renew for the worker's own lease, not the hub's default.
            job = self._client.heartbeat(self.job, extend=self._lease)
        except ClientError as exc:
            self._note(exc)
        else:
            with self._lock:
                self.job = job
                self.renewed = time.monotonic()
                self.cancelled = job.cancel_requested

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
        prefetch: int | None = None,
        client: Client | None = None,
        token: Token | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch is not None and prefetch < 0:
            raise ValueError("prefetch must not be negative")
        self.client = client or Client(url, token=token)
        self.concurrency = concurrency
        #: Jobs a queue's claimer may hold beyond its idle threads: they wait (leased, with
        #: heartbeats) for a thread, and spare claim requests. None: follow the jobs (see the
        #: module's docstring); 0: claim only for idle threads.
        self.prefetch = prefetch
        self.lease = lease
        self.tasks: dict[str, Task] = {}
        self.stopping = threading.Event()
        self.done = 0
        self._held: dict[str, JobContext] = {}  # every job claimed and not yet reported
        self._held_lock = threading.Lock()
        self._reports: queue.SimpleQueue[tuple[str, Completion | Failure] | None] = (
            queue.SimpleQueue()
        )

    def task(self, queue: str) -> Callable[[Task], Task]:
        """Register the decorated function for the jobs of ``queue``."""

        def register(function: Task) -> Task:
            self.tasks[queue] = function
            return function

        return register

    def stop(self) -> None:
        """Take no new job; the ones claimed run and are reported."""
        self.stopping.set()

    def run(self) -> None:
        """Work until :meth:`stop` (or SIGTERM / SIGINT in the main thread)."""
        if not self.tasks:
            raise ValueError("no task: register one with @worker.task(queue)")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop())
        lanes = [_Lane(self, name, function) for name, function in self.tasks.items()]
        working = [thread for lane in lanes for thread in lane.start()]
        reporter = threading.Thread(target=self._report_forever, daemon=True)
        keeper_done = threading.Event()
        keeper = threading.Thread(target=self._keep_leases, args=(keeper_done,), daemon=True)
        reporter.start()
        keeper.start()
        _join(working)
        self._reports.put(None)  # every job has run: report the last ones, then end
        _join([reporter])
        keeper_done.set()
        _join([keeper])

    # -- what the threads share ---------------------------------------------------------------

    def _hold(self, jobs: list[Job]) -> list[JobContext]:
        contexts = [JobContext(self.client, job, self.lease) for job in jobs]
        with self._held_lock:
            for context in contexts:
                self._held[context.job.id] = context
        return contexts

    def _ended(self, queue: str, outcome: Completion | Failure) -> None:
        self.done += 1
        self._reports.put((queue, outcome))

    def _report_forever(self) -> None:
        """Send the ends of jobs: what is ready at once, in one request per queue."""
        while True:
            first = self._reports.get()
            if first is None:
                return
            batch = [first]
            last = False
            while len(batch) < REPORT_BATCH:
                try:
                    item = self._reports.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    last = True
                    break
                batch.append(item)
            by_queue: dict[str, list[Completion | Failure]] = {}
            for name, outcome in batch:
                by_queue.setdefault(name, []).append(outcome)
            for name, outcomes in by_queue.items():
                self._report(name, outcomes)
            if last:
                return

    def _report(self, queue: str, outcomes: list[Completion | Failure]) -> None:
        try:
            answers = self.client.finish_many(queue, outcomes)
        except ClientError as exc:
            # The leases run out and the jobs run again: at least once.
            log.error("could not report the end of %d jobs: %s", len(outcomes), exc)
            answers = []
        for answer in answers:
            error = answer.error
            if error is not None and error.slug != "lease-lost":  # lost: given to another
                log.error("could not report the end of job %s: %s", answer.id, error)
        with self._held_lock:
            for outcome in outcomes:
                self._held.pop(outcome.job.id, None)

    def _keep_leases(self, done: threading.Event) -> None:
        """Renew the lease of every job held, a third of the lease after its last renewal."""
        every = self.lease / 3
        while not done.wait(min(every / 2, 1.0)):
            now = time.monotonic()
            with self._held_lock:
                due = [c for c in self._held.values() if now - c.renewed >= every]
            for context in due:
                context.heartbeat()


class _Lane:
    """One queue of a worker: its claimer thread and its task threads."""

    def __init__(self, worker: Worker, name: str, function: Task) -> None:
        self.worker = worker
        self.name = name
        self.function = function
        self.wants_context = len(inspect.signature(function).parameters) >= 2
        self.ready: queue.SimpleQueue[JobContext | None] = queue.SimpleQueue()
        self.changed = threading.Condition()
        self.held = 0  # jobs claimed (or being claimed) and not yet run to the end
        self.run_time = 0.0  # running averages, in seconds: a job's run, a prompt claim
        self.claim_time = 0.0

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._claim_forever, daemon=True)]
        threads += [
            threading.Thread(target=self._run_forever, daemon=True)
            for _ in range(self.worker.concurrency)
        ]
        for thread in threads:
            thread.start()
        return threads

    def capacity(self) -> int:
        """How many jobs the lane may hold: a job per thread, plus the prefetch."""
        worker = self.worker
        prefetch = worker.prefetch
        if prefetch is None:
            # Enough jobs to keep every thread busy while the next claim is on its way.
            if self.run_time <= 0:
                prefetch = 0
            else:
                wanted = worker.concurrency * self.claim_time / self.run_time
                prefetch = int(min(wanted, MAX_PREFETCH))
        return worker.concurrency + prefetch

    def _claim_forever(self) -> None:
        worker = self.worker
        try:
            while not worker.stopping.is_set():
                with self.changed:
                    free = min(self.capacity() - self.held, BATCH_SIZE)
                    if free <= 0:
                        self.changed.wait(0.2)
                        continue
                    self.held += free
                began = time.perf_counter()
                try:
                    jobs = worker.client.claim_many(
                        self.name, limit=free, wait=CLAIM_WAIT, lease=worker.lease
                    )
                except ClientError as exc:
                    jobs = []
                    log.warning("claim on %s failed: %s; retrying", self.name, exc)
                    worker.stopping.wait(1.0)
                if len(jobs) == free:  # answered at once: a round trip, not a wait for jobs
                    self.claim_time = _average(self.claim_time, time.perf_counter() - began)
                with self.changed:
                    self.held -= free - len(jobs)
                for context in worker._hold(jobs):
                    self.ready.put(context)
        finally:
            for _ in range(worker.concurrency):
                self.ready.put(None)  # the task threads end once the jobs claimed have run

    def _run_forever(self) -> None:
        while (context := self.ready.get()) is not None:
            began = time.perf_counter()
            try:
                self._run(context)
            finally:
                self.run_time = _average(self.run_time, time.perf_counter() - began)
                with self.changed:
                    self.held -= 1
                    self.changed.notify()

    def _run(self, context: JobContext) -> None:
        job = context.job
        outcome: Completion | Failure
        try:
            payload = job.payload
            result = (
                self.function(payload, context) if self.wants_context else self.function(payload)
            )
        except Exception as exc:
            log.warning("job %s failed: %r", job.id, exc)
            outcome = Failure(context.job, f"{type(exc).__name__}: {exc}")
        else:
            try:
                outcome = Completion(context.job, orjson.Fragment(orjson.dumps(result)))
            except TypeError as exc:  # the result is not JSON: the task is at fault
                error = f"the task's result cannot be sent as JSON: {exc}"
                outcome = Failure(context.job, error, retry=False)
        self.worker._ended(self.name, outcome)


def _average(average: float, sample: float) -> float:
    return sample if average == 0 else average + SMOOTHING * (sample - average)


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
