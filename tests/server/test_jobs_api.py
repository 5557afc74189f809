"""The jobs API in process, over the memory store, with a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from backchannel import Settings, create_app
from backchannel.server import BackchannelApp
from backchannel.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def app(clock: Clock) -> AsyncIterator[BackchannelApp]:
    application = create_app(Settings(max_wait=5), store=MemoryStore(), clock=clock)
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def client(app: BackchannelApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as c:
        yield c


async def submit(client: httpx.AsyncClient, payload: object = None, **kwargs: object) -> dict:  # type: ignore[type-arg]
    response = await client.post("/v1/queues/video/jobs", json=payload or {"f": 1}, **kwargs)  # type: ignore[arg-type]
    assert response.status_code in (200, 202), response.text
    return response.json()  # type: ignore[no-any-return]


async def claim(client: httpx.AsyncClient, **params: object) -> dict:  # type: ignore[type-arg]
    response = await client.post("/v1/queues/video/claim", params=params)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def problem(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["type"] == f"/problems/{slug}"


async def test_submit_answers_202_with_location(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/queues/video/jobs", json={"file": "a.mp4"})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert response.headers["retry-after"] == "1"
    assert (job["state"], job["attempts"], job["payload"]) == ("queued", 0, {"file": "a.mp4"})
    polled = await client.get(response.headers["location"])
    assert polled.json() == job


async def test_worker_life_cycle(client: httpx.AsyncClient) -> None:
    job = await submit(client)
    taken = await claim(client)
    assert (taken["id"], taken["state"], taken["attempts"]) == (job["id"], "running", 1)
    assert taken["lease"] and taken["lease_expires"]
    lease = {"lease": taken["lease"]}
    progressed = await client.post(f"/v1/jobs/{job['id']}/progress", json=lease | {"progress": 50})
    assert progressed.json()["progress"] == 50
    beat = await client.post(f"/v1/jobs/{job['id']}/heartbeat", json=lease)
    assert beat.json()["cancel_requested"] is False
    done = await client.post(f"/v1/jobs/{job['id']}/complete", json=lease | {"result": {"ok": 1}})
    assert (done.json()["state"], done.json()["result"]) == ("succeeded", {"ok": 1})
    again = await client.post(f"/v1/jobs/{job['id']}/complete", json=lease | {"result": 2})
    problem(again, 409, "lease-lost")
    assert (await client.post("/v1/queues/video/claim")).status_code == 204


async def test_long_poll_answers_on_a_change(client: httpx.AsyncClient) -> None:
    job = await submit(client)
    waiting = asyncio.create_task(
        client.get(f"/v1/jobs/{job['id']}", params={"wait": 5, "version": job["version"]})
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await claim(client)
    changed = (await asyncio.wait_for(waiting, 2)).json()
    assert changed["state"] == "running" and changed["version"] > job["version"]
    quiet = await client.get(
        f"/v1/jobs/{job['id']}", params={"wait": 0.05, "version": changed["version"]}
    )
    assert quiet.json()["version"] == changed["version"]


async def test_prefer_wait_makes_a_synchronous_call(client: httpx.AsyncClient) -> None:
    async def worker() -> None:
        taken = await claim(client, wait=5)
        await client.post(
            f"/v1/jobs/{taken['id']}/complete", json={"lease": taken["lease"], "result": "done"}
        )

    working = asyncio.create_task(worker())
    response = await client.post(
        "/v1/queues/video/jobs", json={"f": 1}, headers={"prefer": "wait=5"}
    )
    await working
    assert response.status_code == 200
    assert response.headers["preference-applied"] == "wait=5"
    assert response.json()["result"] == "done"
    slow = await client.post("/v1/queues/video/jobs", json={"f": 2}, headers={"prefer": "wait=0.1"})
    assert slow.status_code == 202 and slow.json()["state"] == "queued"


async def test_idempotent_submit_returns_the_same_job(client: httpx.AsyncClient) -> None:
    first = await submit(client, headers={"idempotency-key": "upload-7"})
    again = await submit(client, headers={"idempotency-key": "upload-7"})
    assert first["id"] == again["id"]


async def test_cancel_while_queued_never_runs(client: httpx.AsyncClient) -> None:
    job = await submit(client)
    cancelled = await client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.json()["state"] == "cancelled"
    assert (await client.post("/v1/queues/video/claim")).status_code == 204
    problem(await client.delete(f"/v1/jobs/{job['id']}"), 409, "job-finished")


async def test_cancel_while_running_tells_the_worker(client: httpx.AsyncClient) -> None:
    job = await submit(client)
    taken = await claim(client)
    asked = (await client.delete(f"/v1/jobs/{job['id']}")).json()
    assert (asked["state"], asked["cancel_requested"]) == ("running", True)
    beat = await client.post(f"/v1/jobs/{job['id']}/heartbeat", json={"lease": taken["lease"]})
    assert beat.json()["cancel_requested"] is True
    ended = await client.post(
        f"/v1/jobs/{job['id']}/fail", json={"lease": taken["lease"], "error": "stopped"}
    )
    assert ended.json()["state"] == "cancelled"


async def test_expired_lease_redelivers_and_the_old_worker_is_refused(
    client: httpx.AsyncClient, clock: Clock
) -> None:
    job = await submit(client)
    first = await claim(client, lease=5)
    clock.now += 6  # the first worker died: its lease runs out
    second = await claim(client)
    assert (second["id"], second["attempts"]) == (job["id"], 2)
    late = await client.post(
        f"/v1/jobs/{job['id']}/complete", json={"lease": first["lease"], "result": "late"}
    )
    problem(late, 409, "lease-lost")
    done = await client.post(
        f"/v1/jobs/{job['id']}/complete", json={"lease": second["lease"], "result": "ok"}
    )
    assert done.json()["state"] == "succeeded"


async def test_attempts_used_up_dead_letter(client: httpx.AsyncClient, clock: Clock) -> None:
    job = (await client.post("/v1/queues/video/jobs", json=1, params={"max_attempts": 2})).json()
    for attempt in (1, 2):
        taken = await claim(client)
        assert taken["attempts"] == attempt
        failed = await client.post(
            f"/v1/jobs/{job['id']}/fail", json={"lease": taken["lease"], "error": f"e{attempt}"}
        )
    assert (failed.json()["state"], failed.json()["error"]) == ("dead", "e2")
    assert (await client.post("/v1/queues/video/claim")).status_code == 204


async def test_fail_without_retry_is_final(client: httpx.AsyncClient) -> None:
    await submit(client)
    taken = await claim(client)
    dead = await client.post(
        f"/v1/jobs/{taken['id']}/fail",
        json={"lease": taken["lease"], "error": "bad input", "retry": False},
    )
    assert dead.json()["state"] == "dead" and dead.json()["attempts"] == 1


async def test_claim_waits_for_a_submit(client: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(client.post("/v1/queues/video/claim", params={"wait": 5}))
    await asyncio.sleep(0.05)
    job = await submit(client)
    assert (await asyncio.wait_for(waiting, 2)).json()["id"] == job["id"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "slug"),
    [
        ("POST", "/v1/queues/video/jobs", {"content": b"{"}, 400, "malformed-json"),
        (
            "POST",
            "/v1/queues/video/jobs",
            {"content": b"x", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported-media-type",
        ),
        ("POST", "/v1/queues/bad name/jobs", {"json": 1}, 400, "invalid-channel"),
        ("POST", "/v1/queues/video/jobs?max_attempts=0", {"json": 1}, 400, "invalid-job"),
        ("GET", "/v1/jobs/" + "0" * 32, {}, 404, "job-not-found"),
        ("GET", "/v1/jobs/not-an-id", {}, 404, "job-not-found"),
        ("GET", "/v1/jobs/" + "0" * 32 + "?wait=-1", {}, 400, "wait-out-of-range"),
        ("POST", "/v1/queues/video/claim?lease=0.5", {}, 400, "invalid-job"),
        ("POST", "/v1/jobs/" + "0" * 32 + "/complete", {"json": {"result": 1}}, 400, "invalid-job"),
        (
            "POST",
            "/v1/jobs/" + "0" * 32 + "/complete",
            {"json": {"lease": "x", "result": 1}},
            404,
            "job-not-found",
        ),
    ],
)
async def test_bad_job_requests(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    slug: str,
) -> None:
    problem(await client.request(method, path, **kwargs), status, slug)  # type: ignore[arg-type]


async def test_submit_checks_and_replays_idempotency_keys(client: httpx.AsyncClient) -> None:
    bad = await client.post("/v1/queues/video/jobs", json=1, headers={"idempotency-key": "a b"})
    problem(bad, 400, "invalid-idempotency-key")
    first = await client.post("/v1/queues/video/jobs", json=1, headers={"idempotency-key": "k"})
    again = await client.post("/v1/queues/video/jobs", json=1, headers={"idempotency-key": "k"})
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_stored_job_is_never_answered_with_an_error(clock: Clock) -> None:
    app = create_app(Settings(max_wait=5, max_long_polls=1), store=MemoryStore(), clock=clock)
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as c:
        holding = asyncio.create_task(c.post("/v1/queues/other/claim", params={"wait": 1}))
        await asyncio.sleep(0.05)  # the one waiting slot is taken
        response = await c.post("/v1/queues/video/jobs", json=1, headers={"prefer": "wait=5"})
        assert response.status_code == 202  # stored: it must say so, not 503
        assert (await c.get(response.headers["location"])).json()["state"] == "queued"
        await holding
    await app.shutdown()


async def test_job_events_refuse_foreign_origins(client: httpx.AsyncClient) -> None:
    job = await submit(client)
    response = await client.get(
        f"/v1/jobs/{job['id']}/events", headers={"origin": "http://elsewhere.example"}
    )
    problem(response, 403, "origin-not-allowed")


async def test_one_job_wakes_one_claimer_and_a_leaving_claimer_passes_it_on(
    app: BackchannelApp,
) -> None:
    jobs = app.jobs
    reads = 0
    candidates = jobs.store.job_candidates

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return await candidates(*args, **kwargs)  # type: ignore[arg-type]

    jobs.store.job_candidates = counting  # type: ignore[method-assign]
    claimers = [asyncio.create_task(jobs.claim("q", wait=5)) for _ in range(10)]
    await asyncio.sleep(0.05)
    before = reads
    claimers[0].cancel()  # this one leaves; if it is the one woken, it hands the turn on
    await jobs.submit("q", b"1")
    await asyncio.sleep(0.05)
    taken = [c for c in claimers[1:] if c.done()]
    assert len(taken) == 1 and taken[0].result() is not None
    assert reads - before <= 2  # not one store read per waiting claimer
    for c in claimers[1:]:
        c.cancel()
    await asyncio.gather(*claimers, return_exceptions=True)


async def test_job_waits_beyond_max_wait_are_shortened_not_refused(
    client: httpx.AsyncClient,
) -> None:
    job = await submit(client)
    long_ask = await client.post("/v1/queues/video/claim", params={"wait": 3600})
    assert long_ask.status_code == 200  # accepted (and answered at once: a job was there)
    changed = await client.get(f"/v1/jobs/{job['id']}", params={"wait": 3600, "version": 1})
    assert changed.json()["state"] == "running"
