"""Batches of jobs in process: batch submit, claim?max=, batch results, streams of many jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from backchannel import Settings, create_app
from backchannel.server import BackchannelApp
from backchannel.store import MemoryStore
from backchannel.wire.sse import Event, EventParser

LIMITS = {
    "max_wait": 5,
    "max_message_bytes": 1000,
    "job_max_batch": 12,
    "job_max_batch_bytes": 20_000,
    "job_max_watch": 20,
}


@pytest.fixture
async def app() -> AsyncIterator[BackchannelApp]:
    application = create_app(Settings(**LIMITS), store=MemoryStore())  # type: ignore[arg-type]
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def client(app: BackchannelApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as c:
        yield c


def problem(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == f"/problems/{slug}"


async def submit_batch(client: httpx.AsyncClient, items: list[Any]) -> list[dict[str, Any]]:
    response = await client.post("/v1/queues/video/jobs/batch", json={"jobs": items})
    assert response.status_code == 200, response.text
    return response.json()["jobs"]  # type: ignore[no-any-return]


async def claim_batch(client: httpx.AsyncClient, **params: object) -> list[dict[str, Any]]:
    response = await client.post("/v1/queues/video/claim", params=params)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return response.json()["jobs"]  # type: ignore[no-any-return]


async def results(client: httpx.AsyncClient, items: list[Any]) -> list[dict[str, Any]]:
    response = await client.post("/v1/queues/video/results", json={"results": items})
    assert response.status_code == 200, response.text
    return response.json()["results"]  # type: ignore[no-any-return]


def events(body: bytes) -> list[Event]:
    parser = EventParser()
    parser.receive_data(body)
    return parser.events()


# -- batch submit -------------------------------------------------------------------------------


async def test_batch_submit_answers_each_job_in_order(client: httpx.AsyncClient) -> None:
    made = await submit_batch(
        client,
        [
            {"payload": {"file": "a.mp4"}},
            {"payload": [1, 2], "max_attempts": 5, "idempotency_key": "k1"},
            {"payload": None},
        ],
    )
    assert [item["status"] for item in made] == [202, 202, 202]
    jobs = [item["job"] for item in made]
    assert [job["payload"] for job in jobs] == [{"file": "a.mp4"}, [1, 2], None]
    assert [job["max_attempts"] for job in jobs] == [3, 5, 3]
    assert all(job["state"] == "queued" and job["version"] == 1 for job in jobs)
    assert len({job["id"] for job in jobs}) == 3
    for job in jobs:  # each is a job like any other
        assert (await client.get(f"/v1/jobs/{job['id']}")).json() == job


async def test_bad_items_are_refused_one_by_one(client: httpx.AsyncClient) -> None:
    made = await submit_batch(
        client,
        [
            {"payload": 1},
            {"no": "payload"},
            "not an object",
            {"payload": 1, "max_attempts": 0},
            {"payload": 1, "max_attempts": True},
            {"payload": 1, "idempotency_key": 7},
            {"payload": 1, "idempotency_key": "has space"},
            {"payload": "x" * 2000},
            {"payload": 2},
        ],
    )
    slugs = [item.get("problem", {}).get("type", "").removeprefix("/problems/") for item in made]
    assert slugs == [
        "",
        "invalid-job",
        "invalid-job",
        "invalid-job",
        "invalid-job",
        "invalid-idempotency-key",
        "invalid-idempotency-key",
        "message-too-large",
        "",
    ]
    assert [item["status"] for item in made] == [202, 400, 400, 400, 400, 400, 400, 413, 202]
    assert made[1]["problem"]["status"] == 400 and "job" not in made[1]
    claimed = await claim_batch(client, max=10)
    assert [job["payload"] for job in claimed] == [1, 2]  # only the good ones exist


async def test_batch_keys_replay_within_the_batch_and_later(client: httpx.AsyncClient) -> None:
    single = await client.post("/v1/queues/video/jobs", json=0, headers={"idempotency-key": "a"})
    made = await submit_batch(
        client,
        [
            {"payload": 1, "idempotency_key": "a"},
            {"payload": 2, "idempotency_key": "b"},
            {"payload": 3, "idempotency_key": "b"},
        ],
    )
    assert made[0]["job"]["id"] == single.json()["id"] and made[0]["replayed"] is True
    assert made[2]["job"]["id"] == made[1]["job"]["id"] and made[2]["replayed"] is True
    assert "replayed" not in made[1]
    again = await submit_batch(client, [{"payload": 9, "idempotency_key": "b"}])
    assert again[0]["job"]["id"] == made[1]["job"]["id"] and again[0]["job"]["payload"] == 2
    # A replayed job that has finished answers 200, as the single submit does.
    taken = await claim_batch(client, max=10)
    await results(client, [{"id": j["id"], "lease": j["lease"], "result": "r"} for j in taken])
    finished = await submit_batch(client, [{"payload": 9, "idempotency_key": "b"}])
    assert (finished[0]["status"], finished[0]["job"]["state"]) == (200, "succeeded")


@pytest.mark.parametrize(
    ("kwargs", "status", "slug"),
    [
        ({"content": b"{"}, 400, "malformed-json"),
        ({"json": [{"payload": 1}]}, 400, "invalid-job"),
        ({"json": {"jobs": {"payload": 1}}}, 400, "invalid-job"),
        ({"json": {"jobs": [{"payload": i} for i in range(13)]}}, 413, "batch-too-large"),
        ({"json": {"jobs": [{"payload": "x" * 900}] * 25}}, 413, "message-too-large"),
        (
            {"content": b'{"jobs": []}', "headers": {"content-type": "text/plain"}},
            415,
            "unsupported-media-type",
        ),
    ],
)
async def test_bad_batches_are_refused_whole(
    client: httpx.AsyncClient, kwargs: dict[str, Any], status: int, slug: str
) -> None:
    problem(await client.post("/v1/queues/video/jobs/batch", **kwargs), status, slug)
    assert await claim_batch(client, max=10) == []  # nothing was stored


async def test_batch_submit_checks_the_queue_name(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/queues/bad name/jobs/batch", json={"jobs": []})
    problem(response, 400, "invalid-channel")
    empty = await client.post("/v1/queues/video/jobs/batch", json={"jobs": []})
    assert empty.json() == {"jobs": []}


# -- claim?max= ---------------------------------------------------------------------------------


async def test_claim_max_takes_the_oldest_jobs_each_with_its_lease(
    client: httpx.AsyncClient,
) -> None:
    made = await submit_batch(client, [{"payload": i} for i in range(5)])
    first = await claim_batch(client, max=3, lease=60)
    assert [job["id"] for job in first] == [item["job"]["id"] for item in made[:3]]
    assert all(job["state"] == "running" and job["attempts"] == 1 for job in first)
    assert len({job["lease"] for job in first}) == 3 and all(job["lease_expires"] for job in first)
    rest = await claim_batch(client, max=10)
    assert [job["payload"] for job in rest] == [3, 4]
    assert await claim_batch(client, max=10) == []  # empty, not 204
    # Without max=, the answer is the single job (or 204) as before.
    assert (await client.post("/v1/queues/video/claim")).status_code == 204


async def test_claim_max_waits_for_the_first_job(client: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(claim_batch(client, max=5, wait=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    made = await submit_batch(client, [{"payload": 1}, {"payload": 2}])
    taken = await asyncio.wait_for(waiting, 2)
    assert {job["id"] for job in taken} <= {item["job"]["id"] for item in made}
    assert len(taken) >= 1


@pytest.mark.parametrize(
    ("query", "status", "slug"),
    [
        ("max=0", 400, "invalid-parameter"),
        ("max=-1", 400, "invalid-parameter"),
        ("max=two", 400, "invalid-parameter"),
        ("max=13", 413, "batch-too-large"),
        ("max=2&max=3", 400, "invalid-parameter"),
        ("max=2&lease=0.5", 400, "invalid-job"),
    ],
)
async def test_bad_batch_claims(
    client: httpx.AsyncClient, query: str, status: int, slug: str
) -> None:
    problem(await client.post(f"/v1/queues/video/claim?{query}"), status, slug)


# -- batch results ------------------------------------------------------------------------------


async def test_results_complete_and_fail_with_an_outcome_per_item(
    client: httpx.AsyncClient,
) -> None:
    await submit_batch(client, [{"payload": i, "max_attempts": 2} for i in range(4)])
    a, b, c, d = await claim_batch(client, max=4)
    other = (await client.post("/v1/queues/audio/jobs", json=1)).json()
    answers = await results(
        client,
        [
            {"id": a["id"], "lease": a["lease"], "result": {"ok": True}},
            {"id": b["id"], "lease": b["lease"], "error": "boom"},
            {"id": c["id"], "lease": c["lease"], "error": "bad input", "retry": False},
            {"id": d["id"], "lease": "not-the-lease", "result": 1},
            {"id": "0" * 32, "lease": "x", "result": 1},
            {"id": other["id"], "lease": "x", "result": 1},  # a job of another queue
            {"id": a["id"], "lease": a["lease"], "result": "again"},  # finished above
            {"id": d["id"], "lease": d["lease"]},
            {"id": d["id"], "lease": d["lease"], "result": 1, "error": "both"},
            {"id": d["id"], "lease": d["lease"], "error": 5},
            ["not", "an", "object"],
        ],
    )
    assert [answer["status"] for answer in answers] == [
        200,
        200,
        200,
        409,
        404,
        404,
        409,
        400,
        400,
        400,
        400,
    ]
    assert [answer.get("state") for answer in answers[:3]] == ["succeeded", "queued", "dead"]
    assert answers[1]["version"] == 3 and answers[0]["id"] == a["id"]
    assert answers[3]["problem"]["type"] == "/problems/lease-lost"
    assert answers[4]["problem"]["type"] == "/problems/job-not-found"
    assert answers[7]["problem"]["type"] == "/problems/invalid-job"
    assert answers[10]["id"] is None
    jobs = {j: (await client.get(f"/v1/jobs/{j}")).json() for j in (a["id"], b["id"], d["id"])}
    assert jobs[a["id"]]["result"] == {"ok": True}
    assert (jobs[b["id"]]["state"], jobs[b["id"]]["error"]) == ("queued", "boom")
    assert jobs[d["id"]]["state"] == "running"  # the bad items left it alone
    assert (await client.get(f"/v1/jobs/{other['id']}")).json()["state"] == "queued"


async def test_the_same_job_twice_in_one_batch_is_finished_once(
    client: httpx.AsyncClient,
) -> None:
    await submit_batch(client, [{"payload": 1}])
    (job,) = await claim_batch(client, max=1)
    item = {"id": job["id"], "lease": job["lease"], "result": 1}
    first, second = await results(client, [item, item])
    assert (first["status"], first["state"]) == (200, "succeeded")
    assert second["problem"]["type"] == "/problems/lease-lost"


async def test_results_of_a_cancelled_job_end_it_cancelled(client: httpx.AsyncClient) -> None:
    await submit_batch(client, [{"payload": 1}])
    (job,) = await claim_batch(client, max=1)
    await client.delete(f"/v1/jobs/{job['id']}")
    (answer,) = await results(client, [{"id": job["id"], "lease": job["lease"], "result": 1}])
    assert answer["state"] == "cancelled"


@pytest.mark.parametrize(
    ("kwargs", "status", "slug"),
    [
        ({"content": b"nope"}, 400, "malformed-json"),
        ({"json": {"results": "x"}}, 400, "invalid-job"),
        (
            {"json": {"results": [{"id": "x", "lease": "y", "result": 1}] * 13}},
            413,
            "batch-too-large",
        ),
    ],
)
async def test_bad_result_batches_are_refused_whole(
    client: httpx.AsyncClient, kwargs: dict[str, Any], status: int, slug: str
) -> None:
    problem(await client.post("/v1/queues/video/results", **kwargs), status, slug)


# -- streams of many jobs -----------------------------------------------------------------------


async def test_stream_sends_each_job_once_finished_and_ends(client: httpx.AsyncClient) -> None:
    made = await submit_batch(client, [{"payload": i} for i in range(3)])
    ids = [item["job"]["id"] for item in made]
    a, b, c = await claim_batch(client, max=3)
    await results(client, [{"id": a["id"], "lease": a["lease"], "result": "early"}])
    # A job that finished before the stream opened is sent at once; the others as they finish.
    stream = asyncio.create_task(client.post("/v1/jobs/events", json={"ids": ids}))
    await asyncio.sleep(0.05)
    assert not stream.done()
    await results(
        client,
        [
            {"id": b["id"], "lease": b["lease"], "error": "x", "retry": False},
            {"id": c["id"], "lease": c["lease"], "result": "late"},
        ],
    )
    response = await asyncio.wait_for(stream, 2)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith("retry: ")
    got = [orjson.loads(event.data) for event in events(response.content)]
    assert [job["id"] for job in got] == ids
    assert [job["state"] for job in got] == ["succeeded", "dead", "succeeded"]
    assert got[0]["result"] == "early" and got[2]["result"] == "late"


async def test_stream_with_changes_all_sends_every_new_version(client: httpx.AsyncClient) -> None:
    (made,) = await submit_batch(client, [{"payload": 1}])
    job_id = made["job"]["id"]
    stream = asyncio.create_task(
        client.get("/v1/jobs/events", params={"id": job_id, "changes": "all"})
    )
    await asyncio.sleep(0.05)
    (job,) = await claim_batch(client, max=1)
    await asyncio.sleep(0.05)
    progress = {"lease": job["lease"], "progress": 50}
    await client.post(f"/v1/jobs/{job_id}/progress", json=progress)
    await asyncio.sleep(0.05)
    await results(client, [{"id": job_id, "lease": job["lease"], "result": "r"}])
    got = [orjson.loads(event.data) for event in events((await stream).content)]
    assert [(j["version"], j["state"]) for j in got] == [
        (1, "queued"),
        (2, "running"),
        (3, "running"),
        (4, "succeeded"),
    ]


async def test_unknown_ids_get_a_problem_event(client: httpx.AsyncClient) -> None:
    (made,) = await submit_batch(client, [{"payload": 1}])
    (job,) = await claim_batch(client, max=1)
    await results(client, [{"id": job["id"], "lease": job["lease"], "result": 1}])
    ids = ["0" * 32, made["job"]["id"], "not-an-id", "0" * 32]
    response = await client.get("/v1/jobs/events", params=[("id", i) for i in ids])
    got = events(response.content)
    assert [event.event for event in got] == ["problem", "problem", "message"]
    problems = [orjson.loads(event.data) for event in got[:2]]
    assert [p["id"] for p in problems] == ["0" * 32, "not-an-id"]
    assert all(p["type"] == "/problems/job-not-found" and p["status"] == 404 for p in problems)


async def test_a_change_during_the_first_read_is_not_missed(app: BackchannelApp) -> None:
    """The stream registers before it reads: a job that finishes between the two is seen."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        (made,) = await submit_batch(client, [{"payload": 1}])
        (job,) = await claim_batch(client, max=1)
        store = app.jobs.store
        read = store.job_get_many  # type: ignore[attr-defined]

        async def read_after_a_finish(ids: list[str]) -> object:
            found = await read(ids)  # the job as it was: running
            await app.jobs.complete(job["id"], job["lease"], b'"meanwhile"')
            return found

        store.job_get_many = read_after_a_finish  # type: ignore[attr-defined]
        response = await asyncio.wait_for(
            client.post("/v1/jobs/events", json={"ids": [made["job"]["id"]]}), 2
        )
    (event,) = events(response.content)
    assert orjson.loads(event.data)["result"] == "meanwhile"


async def test_streams_send_heartbeats_and_follow_allowed_origins() -> None:
    settings = Settings(sse_heartbeat=0.05, allowed_origins="http://ok.example", **LIMITS)  # type: ignore[arg-type]
    app = create_app(settings, store=MemoryStore())
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        (made,) = await submit_batch(client, [{"payload": 1}])
        job_id = made["job"]["id"]
        foreign = {"origin": "http://elsewhere.example"}
        response = await client.get("/v1/jobs/events", params={"id": job_id}, headers=foreign)
        problem(response, 403, "origin-not-allowed")
        stream = asyncio.create_task(
            client.get(
                "/v1/jobs/events", params={"id": job_id}, headers={"origin": "http://ok.example"}
            )
        )
        await asyncio.sleep(0.2)
        (job,) = await claim_batch(client, max=1)
        await results(client, [{"id": job_id, "lease": job["lease"], "result": 1}])
        response = await asyncio.wait_for(stream, 2)
    await app.shutdown()
    assert response.headers["access-control-allow-origin"] == "http://ok.example"
    assert b": heartbeat\n\n" in response.content
    assert len(events(response.content)) == 1


@pytest.mark.parametrize(
    ("method", "kwargs", "status", "slug"),
    [
        ("GET", {}, 400, "invalid-job"),
        ("GET", {"params": {"id": "0" * 32, "changes": "some"}}, 400, "invalid-parameter"),
        ("GET", {"params": [("id", str(i)) for i in range(21)]}, 413, "batch-too-large"),
        ("GET", {"params": [("id", str(i)) for i in range(51)]}, 400, "invalid-parameter"),
        ("POST", {"content": b"["}, 400, "malformed-json"),
        ("POST", {"json": ["a"]}, 400, "invalid-job"),
        ("POST", {"json": {"ids": "a"}}, 400, "invalid-job"),
        ("POST", {"json": {"ids": [1, 2]}}, 400, "invalid-job"),
        ("POST", {"json": {"ids": []}}, 400, "invalid-job"),
        ("POST", {"json": {"ids": ["a"] * 21}}, 413, "batch-too-large"),
        ("POST", {"json": {"ids": ["a"], "changes": None}}, 400, "invalid-parameter"),
        ("POST", {"json": {"ids": ["a" * 40] * 600}}, 413, "message-too-large"),
    ],
)
async def test_bad_streams_are_refused_before_they_start(
    client: httpx.AsyncClient, method: str, kwargs: dict[str, Any], status: int, slug: str
) -> None:
    problem(await client.request(method, "/v1/jobs/events", **kwargs), status, slug)


async def test_watches_count_toward_the_waiting_limit() -> None:
    app = create_app(Settings(max_long_polls=1, **LIMITS), store=MemoryStore())  # type: ignore[arg-type]
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        (made,) = await submit_batch(client, [{"payload": 1}])
        ids = {"ids": [made["job"]["id"]]}
        first = asyncio.create_task(client.post("/v1/jobs/events", json=ids))
        await asyncio.sleep(0.05)
        response = await client.post("/v1/jobs/events", json=ids)
        problem(response, 503, "too-busy")
        await app.shutdown()  # ends the first stream
        assert (await asyncio.wait_for(first, 2)).status_code == 200
