"""HTTP endpoints of jobs: submit, watch (short poll, long poll, SSE), cancel; claim, finish.

A job document embeds the payload exactly as it was submitted, and the progress and result as
the JSON values the worker sent.
``Prefer: wait=N`` (RFC 7240) on a submit turns the call synchronous when the job finishes in
time. See ``docs/jobs.md``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from ..core.channels import validate_channel
from ..core.errors import TooBusy
from ..core.grants import Action
from ..core.jobs import Job
from ..wire.jsonfmt import format_time
from ..wire.payload import Encoding, InvalidPayload, encoding_for, validate_payload
from ..wire.sse import encode_comment, encode_event, encode_retry
from .auth import require, require_job
from .http import JSON, ClientDisconnected, Request, Response
from .problems import HTTPProblem
from .sse import TOKEN_EXPIRED_EVENT, stream_headers

NO_STORE = (b"cache-control", b"no-store")
MAX_COMMAND_BYTES = 1 << 20
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def job_document(job: Job, *, with_lease: bool = False) -> bytes:
    def raw(value: bytes | None) -> Any:
        return None if value is None else orjson.Fragment(value)

    document: dict[str, Any] = {
        "id": job.id,
        "queue": job.queue,
        "state": job.state.value,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created": format_time(job.created_ms),
        "updated": format_time(job.updated_ms),
        "version": job.version,
        "payload": raw(job.payload),
        "progress": raw(job.progress),
        "result": raw(job.result),
        "error": job.error,
        "cancel_requested": job.cancel_requested,
    }
    if with_lease:
        document["lease"] = job.lease
        document["lease_expires"] = (
            format_time(job.lease_expires_ms) if job.lease_expires_ms is not None else None
        )
    return orjson.dumps(document)


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


async def submit(request: Request) -> Response:
    jobs = request.app.jobs
    queue = validate_channel(request.params["queue"])
    require(request.identity, Action.SUBMIT, queue)
    content_type = request.header(b"content-type")
    if content_type is not None and encoding_for(content_type) is not Encoding.JSON:
        raise HTTPProblem("unsupported-media-type", "a job's payload is JSON (application/json)")
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
