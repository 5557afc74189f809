"""The Worker's threads against a fake client: claims sized by the room, results in batches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import orjson

from backchannel.client import Completion, Failure, Finished, Job, Worker
from backchannel.client import worker as worker_module


def job(n: int) -> Job:
    return Job(
        id=f"{n:032x}",
        queue="q",
        state="running",
        attempts=1,
        max_attempts=3,
        version=2,
        payload=n,
        progress=None,
        result=None,
        error=None,
        cancel_requested=False,
        created="",
        updated="",
        lease=f"lease-{n}",
    )


class FakeClient:
    """Hands out ``total`` jobs and records what the worker asks and reports. The first report
    blocks until ``release`` is set, so the jobs that end meanwhile pile up."""

    def __init__(self, total: int) -> None:
        self.left = list(range(total))
        self.limits: list[int] = []
        self.reports: list[list[Completion | Failure]] = []
        self.release = threading.Event()
        self.first_report = threading.Event()
        self.lock = threading.Lock()

    def claim_many(self, queue: str, *, limit: int, wait: float, lease: float) -> list[Job]:
        with self.lock:
            self.limits.append(limit)
            taken, self.left = self.left[:limit], self.left[limit:]
        if not taken:
            threading.Event().wait(0.01)
        return [job(n) for n in taken]

    def finish_many(self, queue: str, outcomes: Sequence[Completion | Failure]) -> list[Finished]:
        self.first_report.set()
        self.release.wait(10)
        with self.lock:
            self.reports.append(list(outcomes))
        return [Finished(id=o.job.id, state="succeeded", version=3) for o in outcomes]

    def heartbeat(self, job: Job, *, extend: float | None = None) -> Job:
        return job


def run(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_claims_are_sized_by_the_room_and_the_ends_are_reported_in_batches() -> None:
    fake = FakeClient(total=40)
    worker = Worker(client=fake, concurrency=2, prefetch=8)  # type: ignore[arg-type]
    ran: list[Any] = []
    worker.task("q")(lambda payload: ran.append(payload) or payload * 2)
    thread = run(worker)
    assert fake.first_report.wait(10)
    while worker.done < 40:  # every job runs while the first report is held up
        threading.Event().wait(0.01)
    fake.release.set()
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert fake.limits[0] == 10  # two threads and a prefetch of eight: room for ten
    assert max(fake.limits) <= 10
    assert sorted(ran) == list(range(40))
    sizes = [len(batch) for batch in fake.reports]
    assert sum(sizes) == 40
    # The jobs that ended while the first report was held up went out together, after it
    # (give or take the last one, whose end may be queued just after the release). How many
    # the first report took depends on how soon the reporting thread woke.
    assert len(sizes) <= 3 and max(sizes[1:], default=0) >= 40 - sizes[0] - 1
    results = {o.job.id: o for batch in fake.reports for o in batch}
    assert all(isinstance(o, Completion) for o in results.values())
    assert orjson.dumps(results[job(7).id].result) == b"14"  # encoded by the task's thread


def test_failures_and_unsendable_results_are_reported_as_failures() -> None:
    fake = FakeClient(total=3)
    fake.release.set()
    worker = Worker(client=fake, concurrency=1, prefetch=0)  # type: ignore[arg-type]

    def task(payload: int) -> object:
        if payload == 0:
            raise ValueError("no good")
        return {1, 2} if payload == 1 else payload

    worker.task("q")(task)
    thread = run(worker)
    while worker.done < 3:
        threading.Event().wait(0.01)
    worker.stop()
    thread.join(10)
    outcomes = {o.job.payload: o for batch in fake.reports for o in batch}
    assert isinstance(outcomes[0], Failure) and outcomes[0].retry
    assert outcomes[0].error == "ValueError: no good"
    assert isinstance(outcomes[1], Failure) and not outcomes[1].retry
    assert "cannot be sent as JSON" in outcomes[1].error
    assert isinstance(outcomes[2], Completion)
    assert set(fake.limits) == {1}  # prefetch 0: a job per idle thread


def test_the_prefetch_follows_the_jobs_by_default() -> None:
    worker = Worker("http://127.0.0.1:9", concurrency=4)
    lane = worker_module._Lane(worker, "q", lambda payload: payload)
    assert lane.capacity() == 4  # nothing measured yet: a job per thread
    lane.run_time, lane.claim_time = 0.5, 0.01  # long jobs, quick claims
    assert lane.capacity() == 4
    lane.run_time, lane.claim_time = 0.001, 0.01  # a claim takes ten jobs' time
    assert lane.capacity() == 4 + 40
    lane.run_time = 1e-7
    assert lane.capacity() == 4 + worker_module.MAX_PREFETCH
    worker.prefetch = 3
    assert lane.capacity() == 7
    worker.client.close()
