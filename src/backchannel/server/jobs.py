"""HTTP endpoints of jobs: submit, watch (short poll, long poll, SSE), cancel; claim, finish.

A job document embeds the payload exactly as it was submitted, and the progress and result as
the JSON values the worker sent.
``Prefer: wait=N`` (RFC 7240) on a submit turns the call synchronous when the job finishes in
time. See ``docs/jobs.md``.

Batches: ``POST /v1/queues/{queue}/jobs/batch`` submits many jobs, ``claim?max=K`` claims up to
K, ``POST /v1/queues/{queue}/results`` completes or fails many, and ``/v1/jobs/events`` streams
the jobs of many ids. A batch answers ``200`` with one entry per item, in order: each item
succeeds or fails on its own (``status`` and ``job``, or ``status`` and ``problem``), so a bad
item never costs the others.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from ..core.channels import validate_channel
from ..core.errors import BackchannelError, TooBusy
from ..core.grants import Action
from ..core.jobqueue import NewJob, Outcome
from ..core.jobs import Job
from ..wire.jsonfmt import format_time
from ..wire.payload import Encoding, InvalidPayload, encoding_for, validate_payload
from ..wire.sse import encode_comment, encode_event, encode_retry
from .auth import require, require_job
from .http import JSON, ClientDisconnected, Request, Response
from .problems import HTTPProblem, problem_for
from .sse import TOKEN_EXPIRED_EVENT, stream_headers

NO_STORE = (b"cache-control", b"no-store")
MAX_COMMAND_BYTES = 1 << 20
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def job_document(job: Job, *, with_lease: bool = False) -> bytes:
    """The job as JSON: payload, progress and result embedded as stored.

    Written out as bytes rather than through a dict: a batch sends thousands. Ids, queue
    names (the channel name rules) and states need no escaping; the error goes through
    ``orjson``."""
    error = b"null" if job.error is None else orjson.dumps(job.error)
    head = (
        f'{{"id":"{job.id}","queue":"{job.queue}","state":"{job.state.value}",'
        f'"attempts":{job.attempts},"max_attempts":{job.max_attempts},'
        f'"created":"{format_time(job.created_ms)}","updated":"{format_time(job.updated_ms)}",'
        f'"version":{job.version},"payload":'
    ).encode()
    tail = b',"cancel_requested":true' if job.cancel_requested else b',"cancel_requested":false'
    if with_lease:
        lease = b"null" if job.lease is None else b'"' + job.lease.encode() + b'"'
        expires = (
            b"null"
            if job.lease_expires_ms is None
            else b'"' + format_time(job.lease_expires_ms).encode() + b'"'
        )
        tail += b',"lease":' + lease + b',"lease_expires":' + expires
    return b"".join(
        (
            head,
            job.payload,
            b',"progress":',
            b"null" if job.progress is None else job.progress,
            b',"result":',
            b"null" if job.result is None else job.result,
            b',"error":',
            error,
            tail,
            b"}",
        )
    )


def job_event(job: Job) -> bytes:
    """One server-sent event carrying the job document (no ``id:``: see :func:`jobs_events`)."""
    document = job_document(job)
    if b"\n" in document or b"\r" in document:  # a payload submitted with line breaks
        return encode_event(document.decode())
    return b"data: " + document + b"\n\n"


def _response(status: int, job: Job, *extra: tuple[bytes, bytes], lease: bool = False) -> Response:
    headers = [NO_STORE, (b"etag", f'"{job.version}"'.encode()), *extra]
    return Response(status, job_document(job, with_lease=lease), JSON, headers)


def _json_body(body: bytes, what: str) -> None:
    try:
        validate_payload("application/json", body)
    except InvalidPayload as exc:
        raise HTTPProblem("malformed-json", f"{what} must be JSON: {exc.detail}") from None


async def _authorize_job(request: Request, action: Action | None) -> Job | None:
    """With auth on: the job, once the caller may ``action`` it (None: read it). Who may
    touch a job is decided by its queue (docs/auth.md, "Jobs")."""
    if not request.app.auth.enabled:
        return None
    job = await request.app.jobs.get(request.params["job"])
    require_job(request.identity, job.queue, action)
    return job


def _json_only(request: Request) -> None:
    content_type = request.header(b"content-type")
    if content_type is not None and encoding_for(content_type) is not Encoding.JSON:
        raise HTTPProblem("unsupported-media-type", "a job's payload is JSON (application/json)")


async def submit(request: Request) -> Response:
    jobs = request.app.jobs
    queue = validate_channel(request.params["queue"])
    require(request.identity, Action.SUBMIT, queue)
    _json_only(request)
    body = await request.body(jobs.limits.max_payload_bytes)
    _json_body(body, "the payload")
    job, replayed = await jobs.submit(
        queue,
        body.strip(),
        idempotency_key=request.header(b"idempotency-key"),
        max_attempts=request.query_whole("max_attempts"),
    )
    prefer = _PREFER_WAIT.search(request.header(b"prefer") or "")
    applied: list[tuple[bytes, bytes]] = []
    if replayed:
        applied.append((b"idempotent-replayed", b"true"))
    if prefer is not None:
        # Answered by the token's expiry at the latest, and the header says so.
        wait = request.cap_wait(min(float(prefer.group(1)), jobs.limits.max_wait))
        applied.append((b"preference-applied", f"wait={wait:g}".encode()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        # Progress wakes the wait too: keep waiting, for what is left, until the job ends.
        # The job is stored already: from here on, any trouble answers 202, never an error.
        while not job.state.finished and not jobs.closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                job = await request.until_disconnected(
                    jobs.watch(job.id, seen=job.version, seconds=remaining)
                )
            except TooBusy:
                break
    if job.state.finished:
        return _response(200, job, *applied)
    location = (request.scope.get("root_path") or "") + f"/v1/jobs/{job.id}"
    return _response(202, job, (b"location", location.encode()), (b"retry-after", b"1"), *applied)


async def get_job(request: Request) -> Response:
    jobs = request.app.jobs
    wait = request.query_seconds("wait") or 0.0
    seen = request.query_whole("version")
    job = await _authorize_job(request, None)
    if wait > 0:
        wait = request.cap_wait(wait)  # answered by the token's expiry at the latest
    if wait:
        job = await request.until_disconnected(
            jobs.wait(request.params["job"], seen=seen, seconds=wait)
        )
    elif job is None:
        job = await jobs.get(request.params["job"])
    return _response(200, job)


async def cancel_job(request: Request) -> Response:
    await _authorize_job(request, Action.SUBMIT)
    return _response(200, await request.app.jobs.cancel(request.params["job"]))


async def claim(request: Request) -> Response:
    jobs = request.app.jobs
    queue = validate_channel(request.params["queue"])
    require(request.identity, Action.CLAIM, queue)
    wait = request.query_seconds("wait") or 0.0
    if wait > 0:
        wait = request.cap_wait(wait)
    lease_seconds = request.query_seconds("lease")
    count = request.query_whole("max")
    if count is not None:  # a batch: {"jobs": [...]}, empty when none came
        taken = await request.until_disconnected(
            jobs.claim_many(queue, count=count, wait=wait, lease=lease_seconds)
        )
        body = b",".join(job_document(job, with_lease=True) for job in taken)
        return Response(200, b'{"jobs":[' + body + b"]}", JSON, [NO_STORE])
    job = await request.until_disconnected(jobs.claim(queue, wait=wait, lease=lease_seconds))
    if job is None:
        return Response(204, b"", None, [NO_STORE])
    return _response(200, job, lease=True)


async def _command(request: Request) -> dict[str, Any]:
    await _authorize_job(request, Action.CLAIM)
    body = await request.body(MAX_COMMAND_BYTES, "1 MiB for worker commands")
    try:
        command = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPProblem("malformed-json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(command, dict) or not isinstance(command.get("lease"), str):
        raise HTTPProblem("invalid-job", 'the body is a JSON object with the "lease" of the claim')
    return command


def _json_field(command: dict[str, Any], name: str) -> bytes:
    if name not in command:
        raise HTTPProblem("invalid-job", f"the body needs {name!r}")
    return orjson.dumps(command[name])


async def heartbeat(request: Request) -> Response:
    command = await _command(request)
    extend = command.get("extend")
    if extend is not None and (not isinstance(extend, int | float) or isinstance(extend, bool)):
        raise HTTPProblem("invalid-job", "extend is a number of seconds")
    job = await request.app.jobs.heartbeat(request.params["job"], command["lease"], extend)
    return _response(200, job, lease=True)


async def progress(request: Request) -> Response:
    command = await _command(request)
    job = await request.app.jobs.progress(
        request.params["job"], command["lease"], _json_field(command, "progress")
    )
    return _response(200, job, lease=True)


async def complete(request: Request) -> Response:
    command = await _command(request)
    job = await request.app.jobs.complete(
        request.params["job"], command["lease"], _json_field(command, "result")
    )
    return _response(200, job)


async def fail(request: Request) -> Response:
    command = await _command(request)
    error = command.get("error", "")
    retry = command.get("retry", True)
    if not isinstance(error, str) or not isinstance(retry, bool):
        raise HTTPProblem("invalid-job", "error is a string and retry a boolean")
    job = await request.app.jobs.fail(request.params["job"], command["lease"], error, retry=retry)
    return _response(200, job)


async def job_events(request: Request) -> None:
    """``GET /v1/jobs/{id}/events``: every new version of the job as one server-sent event
    (``id`` is the version, ``data`` the job document), ending after the final state.
    ``Last-Event-ID`` resumes after that version."""
    jobs = request.app.jobs
    job = await jobs.get(request.params["job"])
    if request.app.auth.enabled:
        require_job(request.identity, job.queue)
    seen = 0
    resume = request.header(b"last-event-id")
    if resume:
        if not (resume.isascii() and resume.isdigit()) or len(resume) > 12:
            raise HTTPProblem("invalid-cursor", "Last-Event-ID is a job version (a number)")
        seen = int(resume)
    settings = request.app.settings
    headers = stream_headers(request)  # the same origin rules as message streams
    request.streaming = True
    await request.send({"type": "http.response.start", "status": 200, "headers": headers})
    retry = encode_retry(int(settings.sse_retry * 1000))
    await request.send({"type": "http.response.body", "body": retry, "more_body": True})
    beat = settings.sse_heartbeat
    while True:
        if job.version > seen:
            event = encode_event(job_document(job).decode(), id=str(job.version))
            await request.send({"type": "http.response.body", "body": event, "more_body": True})
            seen = job.version
        if job.state.finished or jobs.closing:
            break
        left = request.seconds_left()
        if left is not None and left <= 0:
            await request.send(
                {"type": "http.response.body", "body": TOKEN_EXPIRED_EVENT, "more_body": True}
            )
            break
        try:
            job = await request.until_disconnected(
                jobs.watch(job.id, seen=seen, seconds=beat if left is None else min(beat, left))
            )
        except ClientDisconnected:
            return
        if job.version <= seen and not job.state.finished:
            body = encode_comment("heartbeat")
            await request.send({"type": "http.response.body", "body": body, "more_body": True})
    await request.send({"type": "http.response.body", "body": b"", "more_body": False})


# -- batches ------------------------------------------------------------------------------------


async def _batch(request: Request, field: str, example: str) -> list[Any]:
    """The list under ``field`` of a batch body, within ``job_max_batch_bytes``."""
    _json_only(request)
    body = await request.body(request.app.settings.job_max_batch_bytes, "job_max_batch_bytes")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPProblem("malformed-json", f"the body is not valid JSON: {exc}") from None
    items = document.get(field) if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise HTTPProblem("invalid-job", f"the body is a JSON object: {example}")
    limit = request.app.jobs.limits.max_batch
    if len(items) > limit:
        raise HTTPProblem(
            "batch-too-large", f"{len(items)} items in one batch; at most {limit} (job_max_batch)"
        )
    return items


def _problem(exc: BackchannelError | HTTPProblem) -> tuple[int, orjson.Fragment]:
    problem = exc if isinstance(exc, HTTPProblem) else problem_for(exc)
    return problem.type.status, orjson.Fragment(problem.body())


def _new_job(item: Any) -> NewJob:
    if not isinstance(item, dict) or "payload" not in item:
        raise HTTPProblem("invalid-job", 'each item is an object with a "payload"')
    key = item.get("idempotency_key")
    if key is not None and not isinstance(key, str):
        raise HTTPProblem("invalid-idempotency-key", "idempotency_key is a string")
    attempts = item.get("max_attempts")
    if attempts is not None and (not isinstance(attempts, int) or isinstance(attempts, bool)):
        raise HTTPProblem("invalid-job", "max_attempts is a whole number")
    return NewJob(payload=orjson.dumps(item["payload"]), idempotency_key=key, max_attempts=attempts)


_Item = TypeVar("_Item")


def _parse_each(
    items: list[Any], parse: Callable[[Any], _Item], *, with_id: bool
) -> tuple[list[dict[str, Any] | None], list[tuple[int, _Item]]]:
    """Parse each item of a batch: the answers so far (a problem in the place of each item
    that did not parse, None elsewhere) and the parsed items with their places."""
    answers: list[dict[str, Any] | None] = [None] * len(items)
    parsed: list[tuple[int, _Item]] = []
    for i, item in enumerate(items):
        try:
            parsed.append((i, parse(item)))
        except HTTPProblem as exc:
            status, problem = _problem(exc)
            answer: dict[str, Any] = {"status": status, "problem": problem}
            if with_id:
                answer = {"id": item.get("id") if isinstance(item, dict) else None, **answer}
            answers[i] = answer
    return answers, parsed


async def submit_batch(request: Request) -> Response:
    """``POST /v1/queues/{queue}/jobs/batch``: ``{"jobs": [{"payload", "idempotency_key",
    "max_attempts"}, ...]}``; per item ``{"status": 202, "job": {...}}`` (``200`` once the job
    has finished; ``"replayed": true`` added for a key used before, as the single submit's
    ``Idempotent-Replayed``) or ``{"status": 4xx, "problem": {...}}``."""
    queue = validate_channel(request.params["queue"])
    require(request.identity, Action.SUBMIT, queue)
    items = await _batch(request, "jobs", '{"jobs": [{"payload": ...}, ...]}')
    answers, todo = _parse_each(items, _new_job, with_id=False)
    done = await request.app.jobs.submit_many(queue, [new for _, new in todo])
    for (i, _), outcome in zip(todo, done, strict=True):
        if isinstance(outcome, BackchannelError):
            status, problem = _problem(outcome)
            answers[i] = {"status": status, "problem": problem}
            continue
        job, replayed = outcome
        answer: dict[str, Any] = {
            "status": 200 if job.state.finished else 202,
            "job": orjson.Fragment(job_document(job)),
        }
        if replayed:
            answer["replayed"] = True
        answers[i] = answer
    return Response(200, orjson.dumps({"jobs": answers}), JSON, [NO_STORE])


def _outcome(item: Any) -> Outcome:
    if not isinstance(item, dict):
        raise HTTPProblem("invalid-job", "each item is an object")
    job_id, lease = item.get("id"), item.get("lease")
    if not isinstance(job_id, str) or not isinstance(lease, str):
        raise HTTPProblem(
            "invalid-job", 'each item has the job\'s "id" and the "lease" of its claim'
        )
    if ("result" in item) == ("error" in item):
        raise HTTPProblem("invalid-job", 'each item has either a "result" or an "error"')
    if "result" in item:
        return Outcome(job_id=job_id, lease=lease, result=orjson.dumps(item["result"]))
    error, retry = item["error"], item.get("retry", True)
    if not isinstance(error, str) or not isinstance(retry, bool):
        raise HTTPProblem("invalid-job", "error is a string and retry a boolean")
    return Outcome(job_id=job_id, lease=lease, error=error, retry=retry)


async def finish_batch(request: Request) -> Response:
    """``POST /v1/queues/{queue}/results``: ``{"results": [{"id", "lease", "result"} or
    {"id", "lease", "error", "retry"}, ...]}``; per item ``{"id", "status": 200, "state",
    "version"}`` or ``{"id", "status": 4xx, "problem": {...}}``."""
    queue = validate_channel(request.params["queue"])
    require(request.identity, Action.CLAIM, queue)
    items = await _batch(request, "results", '{"results": [{"id", "lease", "result"}, ...]}')
    answers, todo = _parse_each(items, _outcome, with_id=True)
    done = await request.app.jobs.finish_many(queue, [outcome for _, outcome in todo])
    for (i, outcome), job in zip(todo, done, strict=True):
        if isinstance(job, BackchannelError):
            status, problem = _problem(job)
            answers[i] = {"id": outcome.job_id, "status": status, "problem": problem}
        else:
            answers[i] = {
                "id": job.id,
                "status": 200,
                "state": job.state.value,
                "version": job.version,
            }
    return Response(200, orjson.dumps({"results": answers}), JSON, [NO_STORE])


async def _watched(request: Request) -> tuple[list[str], bool]:
    """The ids and the ``changes`` of a watch: from the query of a GET, the body of a POST."""
    if request.method == "POST":
        _json_only(request)
        body = await request.body(request.app.settings.job_max_batch_bytes, "job_max_batch_bytes")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise HTTPProblem("malformed-json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise HTTPProblem("invalid-job", 'the body is a JSON object: {"ids": [...]}')
        ids, changes = document.get("ids"), document.get("changes", "final")
    else:
        ids = request.query_all("id")
        changes = request.query(repeatable=frozenset({"id"})).get("changes", "final")
    if not isinstance(ids, list) or not all(isinstance(job_id, str) for job_id in ids):
        raise HTTPProblem("invalid-job", "ids is a list of job ids")
    if changes not in ("final", "all"):
        raise HTTPProblem("invalid-parameter", 'changes is "final" or "all"')
    return ids, changes == "final"


async def jobs_events(request: Request) -> None:
    """``GET /v1/jobs/events?id=A&id=B`` or ``POST /v1/jobs/events`` with ``{"ids": [...]}``:
    server-sent events of many jobs. Each event's data is a job document: by default only
    once the job has finished (``changes=final``), with ``changes=all`` for every new version.
    An id with no job gets one ``event: problem`` (``job-not-found``, with the ``id``). The
    stream ends once every job has had its final event.

    Nothing is missed between reading the jobs and following them (the watch is registered
    first), and a job that finished before the request is sent at once; so a client resumes by
    asking again for the ids it has not seen finish. Events have no ``id:``."""
    jobs = request.app.jobs
    ids, final_only = await _watched(request)
    if request.app.auth.enabled:
        # All or nothing: a stream that left out the jobs the token may not read would look
        # like jobs that never finish.
        for job in await jobs.get_many(ids):
            require_job(request.identity, job.queue)
    settings = request.app.settings
    headers = stream_headers(request)  # the same origin rules as message streams
    async with jobs.watch_many(ids, final_only=final_only) as watch:
        request.streaming = True
        await request.send({"type": "http.response.start", "status": 200, "headers": headers})
        retry = encode_retry(int(settings.sse_retry * 1000))
        await request.send({"type": "http.response.body", "body": retry, "more_body": True})
        beat = settings.sse_heartbeat
        while True:
            chunks = [_missing_event(job_id) for job_id in watch.take_missing()]
            chunks += [job_event(job) for job in watch.take()]
            if chunks:
                body = b"".join(chunks)
                await request.send({"type": "http.response.body", "body": body, "more_body": True})
            if watch.done or jobs.closing:
                break
            left = request.seconds_left()
            if left is not None and left <= 0:
                await request.send(
                    {"type": "http.response.body", "body": TOKEN_EXPIRED_EVENT, "more_body": True}
                )
                break
            try:
                await request.until_disconnected(
                    watch.wait(beat if left is None else min(beat, left))
                )
            except ClientDisconnected:
                return
            if not watch.ready:
                body = encode_comment("heartbeat")
                await request.send({"type": "http.response.body", "body": body, "more_body": True})
    await request.send({"type": "http.response.body", "body": b"", "more_body": False})


async def jobs_events_of_body(request: Request) -> None:
    """``POST /v1/jobs/events``: :func:`jobs_events` with the ids in the body."""
    await jobs_events(request)


def _missing_event(job_id: str) -> bytes:
    problem = HTTPProblem(
        "job-not-found", f"there is no job {job_id[:40]} (or it finished long ago)"
    )
    document = orjson.loads(problem.body())
    document["id"] = job_id[:40]
    return encode_event(orjson.dumps(document).decode(), event="problem")
