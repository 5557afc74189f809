"""Jobs against a real hub process and its SQLite file, killed with SIGKILL."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import HubProcess, on_every_store

pytestmark = pytest.mark.e2e


def submit(c: httpx.Client, n: int) -> str:
    response = c.post("/v1/queues/work/jobs", json={"n": n})
    assert response.status_code == 202
    return str(response.json()["id"])


def claim(c: httpx.Client, **params: object) -> dict[str, object] | None:
    response = c.post("/v1/queues/work/claim", params=params)  # type: ignore[arg-type]
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@on_every_store
def test_kill_9_keeps_queued_running_and_done_jobs(hub: HubProcess) -> None:
    with hub.client() as c:
        done, running, queued = submit(c, 1), submit(c, 2), submit(c, 3)
        first = claim(c)
        assert first is not None and first["id"] == done
        finished = c.post(
            f"/v1/jobs/{done}/complete", json={"lease": first["lease"], "result": "r1"}
        )
        assert finished.json()["state"] == "succeeded"
        second = claim(c, lease=2)
        assert second is not None and second["id"] == running
    hub.kill()  # jobs queued, running and done, acknowledged
    hub.start()
    with hub.client() as c:
        assert c.get(f"/v1/jobs/{done}").json()["result"] == "r1"
        assert c.get(f"/v1/jobs/{running}").json()["state"] == "running"
        # The finished job never runs again; the queued one is next.
        third = claim(c)
        assert third is not None and third["id"] == queued
        # The running job's worker died with the hub: after its lease, another worker gets it.
        deadline = time.monotonic() + 15
        again = None
        while again is None and time.monotonic() < deadline:
            again = claim(c, wait=1)
        assert again is not None and again["id"] == running and again["attempts"] == 2
        c.post(f"/v1/jobs/{running}/complete", json={"lease": again["lease"], "result": "r2"})
        assert claim(c) is None
        states = {j: c.get(f"/v1/jobs/{j}").json()["state"] for j in (done, running, queued)}
    assert states == {done: "succeeded", running: "succeeded", queued: "running"}


def test_a_killed_worker_s_job_is_run_by_another_after_its_lease(hub: HubProcess) -> None:
    with hub.client() as c:
        job = submit(c, 1)
        dead_worker = claim(c, lease=1)  # then the worker process dies: no heartbeat
        assert dead_worker is not None
        other = None
        deadline = time.monotonic() + 15
        while other is None and time.monotonic() < deadline:
            other = claim(c, wait=1)
        assert other is not None and other["id"] == job and other["attempts"] == 2
        late = c.post(f"/v1/jobs/{job}/complete", json={"lease": dead_worker["lease"], "result": 0})
        assert late.status_code == 409


@on_every_store
def test_prefer_wait_through_a_real_server(hub: HubProcess) -> None:
    import threading

    with hub.client() as c:

        def worker() -> None:
            with hub.client() as w:
                taken = claim(w, wait=10)
                assert taken is not None
                w.post(
                    f"/v1/jobs/{taken['id']}/progress",
                    json={"lease": taken["lease"], "progress": 0.5},
                )
                w.post(
                    f"/v1/jobs/{taken['id']}/complete",
                    json={"lease": taken["lease"], "result": {"ok": True}},
                )

        thread = threading.Thread(target=worker)
        thread.start()
        response = c.post("/v1/queues/work/jobs", json={"n": 1}, headers={"prefer": "wait=10"})
        thread.join(10)
    assert response.status_code == 200
    assert response.json()["result"] == {"ok": True}
    assert response.headers["preference-applied"] == "wait=10"


@on_every_store
def test_job_events_stream_progress_and_end_with_the_final_state(hub: HubProcess) -> None:
    import json
    import threading

    from backchannel.wire.sse import EventParser

    with hub.client() as c:
        job = submit(c, 1)
        events: list[tuple[str, dict[str, object]]] = []

        def listen() -> None:
            parser = EventParser()
            with hub.client() as s, s.stream("GET", f"/v1/jobs/{job}/events") as stream:
                for chunk in stream.iter_raw():
                    parser.receive_data(chunk)
                    events.extend((e.id, json.loads(e.data)) for e in parser.events())

        listener = threading.Thread(target=listen)
        listener.start()
        taken = claim(c, wait=5)
        assert taken is not None
        for pct in (0.25, 0.5):
            c.post(f"/v1/jobs/{job}/progress", json={"lease": taken["lease"], "progress": pct})
        c.post(f"/v1/jobs/{job}/complete", json={"lease": taken["lease"], "result": "ok"})
        listener.join(10)
        assert not listener.is_alive(), "the stream did not end with the job"
        # Resume after version 2.
        resumed = EventParser()
        with c.stream("GET", f"/v1/jobs/{job}/events", headers={"last-event-id": "2"}) as stream:
            for chunk in stream.iter_raw():
                resumed.receive_data(chunk)
        later = [int(e.id) for e in resumed.events()]
    versions = [int(i) for i, _ in events]
    assert versions == sorted(versions) and versions[-1] == 5
    assert events[-1][1]["state"] == "succeeded" and events[-1][1]["result"] == "ok"
    # A resumed stream gets the job as it is now (each event carries the whole job), then
    # ends, as the job is finished.
    assert later == [5]
