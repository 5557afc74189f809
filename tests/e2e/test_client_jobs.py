"""Jobs through the SDK and the CLI against a real hub: submit, wait, progress, workers."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from backchannel.client import (
    AsyncClient,
    Client,
    Completion,
    Failure,
    HubError,
    JobBatchError,
    JobContext,
    JobFailed,
    JobHandle,
    RetryPolicy,
    Worker,
)

from .conftest import HubProcess, on_every_store

pytestmark = pytest.mark.e2e
TESTS = Path(__file__).resolve().parent


def start_worker(hub: HubProcess, tasks: dict[str, Any], concurrency: int = 2) -> Worker:
    worker = Worker(hub.url, concurrency=concurrency, lease=5)
    for queue, function in tasks.items():
        worker.task(queue)(function)
    threading.Thread(target=worker.run, daemon=True).start()
    return worker


@on_every_store
def test_submit_then_a_worker_returns_the_result(hub: HubProcess) -> None:
    def square(payload: dict[str, int]) -> int:
        return payload["n"] ** 2

    def broken(payload: Any) -> None:
        raise ValueError("no good")

    worker = start_worker(hub, {"square": square, "broken": broken})
    with Client(hub.url) as client:
        handles = [client.submit("square", {"n": n}) for n in range(5)]
        assert [h.result(timeout=20) for h in handles] == [0, 1, 4, 9, 16]
        failing = client.submit("broken", {}, max_attempts=2)
        with pytest.raises(JobFailed) as info:
            failing.result(timeout=20)
        assert info.value.job.state == "dead" and info.value.job.attempts == 2
        assert "ValueError: no good" in (info.value.job.error or "")
        synchronous = client.submit("square", {"n": 7}, wait=10)
        assert synchronous.last.finished and synchronous.last.result == 49
    worker.stop()


def test_progress_is_seen_version_by_version(hub: HubProcess) -> None:
    # The task reports a step only once the client has seen the one before (the first once it
    # has seen anything): every step is its own version, and none is overwritten unseen.
    seen_before = {None: threading.Event(), 25: threading.Event(), 50: threading.Event()}

    def steps(payload: Any, job: JobContext) -> str:
        for before, pct in ((None, 25), (25, 50), (50, 75)):
            assert seen_before[before].wait(10)
            job.progress(pct)
        return "done"

    worker = start_worker(hub, {"steps": steps}, concurrency=1)
    with Client(hub.url) as client:
        handle = client.submit("steps", {})
        seen = []
        for job in handle.progress():
            seen.append((job.state, job.progress))
            seen_before[None].set()
            if job.progress in seen_before:
                seen_before[job.progress].set()
    worker.stop()
    assert seen[-1] == ("succeeded", 75)
    assert [p for s, p in seen if s == "running" and p is not None] == [25, 50, 75]


def test_cancel_reaches_a_running_task(hub: HubProcess) -> None:
    started, noticed = threading.Event(), threading.Event()

    def long_task(payload: Any, job: JobContext) -> str:
        started.set()
        for _ in range(200):
            job.heartbeat()
            if job.cancelled:
                noticed.set()
                return "stopped early"
            threading.Event().wait(0.05)
        return "ran to the end"

    worker = start_worker(hub, {"long": long_task}, concurrency=1)
    with Client(hub.url) as client:
        handle = client.submit("long", {})
        assert started.wait(10)
        handle.cancel()
        final = handle.wait(timeout=15)
    worker.stop()
    assert noticed.is_set()
    assert final.state == "cancelled"


async def test_async_twin_submits_and_waits(hub: HubProcess) -> None:
    worker = start_worker(hub, {"echo": lambda payload: payload})
    async with AsyncClient(hub.url) as client:
        handle = await client.submit("echo", {"hello": "world"})
        assert await handle.result(timeout=20) == {"hello": "world"}
        versions = [job.version async for job in (await client.submit("echo", 1)).progress()]
        assert versions == sorted(versions) and len(versions) >= 2
    worker.stop()


def test_cli_job_commands_and_worker_process(hub: HubProcess) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "backchannel", *args, "--url", hub.url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    submitted = cli("job", "submit", "math", '{"n": 21}')
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    assert json.loads(cli("job", "status", job_id).stdout)["state"] == "queued"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backchannel",
            "worker",
            "worker_tasks:double",
            "--queue",
            "math",
            "--url",
            hub.url,
        ],
        cwd=TESTS,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waited = cli("job", "wait", job_id, "--timeout", "30")
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["result"] == {"doubled": 42}
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0  # graceful: stops claiming, exits
    other = json.loads(cli("job", "submit", "math", '{"n": 1}').stdout)["id"]
    cancelled = cli("job", "cancel", other)
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    assert cli("job", "wait", other).returncode == 1
    assert cli("job", "submit", "math", "{nope").returncode != 0


def test_worker_heartbeats_keep_a_lease_longer_than_the_hub_default(
    hub_factory: type[HubProcess],
) -> None:
    hub = hub_factory("--job-lease", "1").start()

    def slow(payload: Any) -> str:
        threading.Event().wait(2.5)  # longer than the hub's default lease of 1 s
        return "once"

    worker = Worker(hub.url, concurrency=1, lease=3)
    worker.task("slow")(slow)
    threading.Thread(target=worker.run, daemon=True).start()
    with Client(hub.url) as client:
        handle = client.submit("slow", {})
        assert handle.result(timeout=20) == "once"
        assert handle.last.attempts == 1
    worker.stop()


def test_a_task_returning_non_json_fails_its_job_and_the_worker_goes_on(hub: HubProcess) -> None:
    calls: list[int] = []

    def odd(payload: dict[str, int]) -> object:
        calls.append(payload["n"])
        return {1, 2} if payload["n"] == 0 else payload["n"]

    worker = start_worker(hub, {"odd": odd}, concurrency=1)
    with Client(hub.url) as client:
        bad = client.submit("odd", {"n": 0})
        good = client.submit("odd", {"n": 5})
        with pytest.raises(JobFailed) as info:
            bad.result(timeout=20)
        assert "cannot be sent as JSON" in (info.value.job.error or "")
        assert good.result(timeout=20) == 5
    worker.stop()
    assert calls == [0, 5]


# -- many jobs ----------------------------------------------------------------------------------


def test_submit_many_then_wait_all_with_a_batching_worker(hub: HubProcess) -> None:
    worker = start_worker(hub, {"square": lambda payload: payload["n"] ** 2}, concurrency=3)
    with Client(hub.url) as client:
        handles = client.submit_many("square", [{"n": n} for n in range(250)], batch_size=100)
        assert [h.last.state for h in handles[:3]] == ["queued"] * 3
        finished = client.wait_all(handles, timeout=60)
        assert [job.result for job in finished] == [n * n for n in range(250)]
        assert all(h.last is job for h, job in zip(handles, finished, strict=True))
        # Already finished: as_finished yields them at once, without a stream.
        assert {job.id for job in client.as_finished(handles)} == {h.id for h in handles}
    worker.stop()
    assert worker.done == 250


def test_submit_many_reports_refused_jobs_and_keeps_the_others(
    hub_factory: type[HubProcess],
) -> None:
    hub = hub_factory("--max-message-bytes", "100").start()
    with Client(hub.url) as client:
        with pytest.raises(JobBatchError) as info:
            client.submit_many("q", [1, "x" * 200, 3], idempotency_keys=["a", "b", "c"])
        handles, errors = info.value.handles, info.value.errors
        assert [h is None for h in handles] == [False, True, False]
        assert (errors[1].status, errors[1].slug) == (413, "message-too-large")
        # The keys make the same batch, sent again, return the same jobs.
        again = client.submit_many("q", [1, 3], idempotency_keys=["a", "c"])
        assert [h.id for h in again] == [handles[0].id, handles[2].id]


def test_claim_many_and_finish_many_by_hand(hub: HubProcess) -> None:
    with Client(hub.url) as client:
        handles = client.submit_many("manual", [1, 2, 3, 4])
        jobs = client.claim_many("manual", limit=3, wait=1)
        assert [job.payload for job in jobs] == [1, 2, 3] and all(job.lease for job in jobs)
        stolen = dataclasses.replace(jobs[2], lease="not-the-lease")
        answers = client.finish_many(
            "manual",
            [
                Completion(jobs[0], {"ok": 1}),
                Failure(jobs[1], "boom", retry=False),
                Completion(stolen, 0),
            ],
        )
        assert [(a.state, a.error and a.error.slug) for a in answers] == [
            ("succeeded", None),
            ("dead", None),
            (None, "lease-lost"),
        ]
        assert client.finish_many("manual", []) == []
        # After its timeout, wait_all gives the unfinished jobs as last seen (here: submitted).
        after = client.wait_all(handles, timeout=0.5)
        assert [job.state for job in after] == ["succeeded", "dead", "queued", "queued"]
        assert after[0].result == {"ok": 1} and after[1].error == "boom"
        (last,) = client.claim_many("manual", limit=5, wait=0)
        assert last.id == handles[3].id
        unknown = dataclasses.replace(handles[0].last, id="0" * 32, state="queued")
        with pytest.raises(HubError) as missing:
            list(client.as_finished([JobHandle(client, unknown)]))
        assert missing.value.slug == "job-not-found"


async def test_async_twins_for_many_jobs(hub: HubProcess) -> None:
    async with AsyncClient(hub.url) as client:
        handles = await client.submit_many("twins", [{"n": n} for n in range(5)])
        jobs = await client.claim_many("twins", limit=10, wait=1)
        assert [job.payload for job in jobs] == [{"n": n} for n in range(5)]
        answers = await client.finish_many(
            "twins", [Completion(job, job.payload["n"]) for job in jobs]
        )
        assert all(answer.state == "succeeded" for answer in answers)
        seen = [job.result async for job in client.as_finished(handles)]
        assert sorted(seen) == list(range(5))
        assert [job.result for job in await client.wait_all(handles)] == list(range(5))


def test_wait_all_carries_on_across_a_hub_restart(hub_factory: type[HubProcess]) -> None:
    hub = hub_factory().start()
    port = urlsplit(hub.url).port
    retry = RetryPolicy(attempts=1, base=0.05, cap=0.2)
    with Client(hub.url, retry=retry, breaker=None) as client:
        handles = client.submit_many("restart", list(range(20)))
        outcome: list[object] = []
        waiting = threading.Thread(
            target=lambda: outcome.append(client.wait_all(handles, timeout=60)), daemon=True
        )
        waiting.start()
        time.sleep(0.3)  # the stream is open, every job still queued
        hub.kill()
        time.sleep(0.3)
        hub.start("--port", str(port))
        worker = start_worker(hub, {"restart": lambda payload: payload * 10})
        waiting.join(60)
        worker.stop()
    assert outcome, "wait_all did not return"
    finished = outcome[0]
    assert [job.result for job in finished] == [n * 10 for n in range(20)]  # type: ignore[attr-defined]
