"""What :class:`Client` and :class:`AsyncClient` share: building requests and reading answers.

Nothing here does I/O: the twins send what :class:`Call` describes with their own httpx client
and hand the response back to :meth:`BaseClient.outcome`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson

from .errors import (
    ClientError,
    HubError,
    HubTimeout,
    HubUnreachable,
    ProtocolViolation,
    hub_error,
)
from .jobs import Completion, Failure, Finished, Job
from .models import Message, Page, Published
from .resilience import CircuitBreaker, Resilience, RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TCP_PORT = 7000
VIAS = ("sse", "ws", "tcp", "longpoll", "poll")
#: A bearer token, or a function that returns the current one (called for every request and
#: every connection, so it can hand out a fresh token when the last one expires).
Token = str | Callable[[], str]

#: Jobs per batch request (the hub's default job_max_batch), and ids per stream of many jobs
#: (its default job_max_watch).
BATCH_SIZE = 1000
WATCH_SIZE = 10_000
#: Seconds a stream of jobs may stay silent: the hub sends a heartbeat every 15 s.
STREAM_READ_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request, and whether it is safe to send again if no answer came back."""

    method: str
    path: str
    safe: bool
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None
    timeout: httpx.Timeout | None = None


def channel_path(channel: str, suffix: str = "") -> str:
    return f"/v1/channels/{quote(channel, safe='')}{suffix}"


def body_of(data: Any, content: bytes | str | None, content_type: str | None) -> tuple[bytes, str]:
    """The bytes and content type of a publish: ``data`` as JSON, or raw ``content``."""
    if content is None:
        return orjson.dumps(data), content_type or "application/json"
    if isinstance(content, str):
        return content.encode(), content_type or "text/plain; charset=utf-8"
    return content, content_type or "application/octet-stream"


def translate(error: httpx.HTTPError, url: str) -> ClientError:
    if isinstance(error, httpx.TimeoutException):
        return HubTimeout(f"the hub at {url} did not answer in time ({type(error).__name__})")
    return HubUnreachable(f"cannot reach the hub at {url}: {error}")


class BaseClient:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = 10.0,
        max_connections: int = 100,
        max_keepalive: int = 20,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        resilience: Resilience | None = None,
        tcp_port: int = DEFAULT_TCP_PORT,
        reconnect_limit: int | None = None,
        token: Token | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not a hub URL (http://host:port)")
        self.host = parts.hostname
        self.ws_url = ("wss" if parts.scheme == "https" else "ws") + self.url[len(parts.scheme) :]
        self.tcp_port = tcp_port
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_keepalive
        )
        # A copy: retry= and breaker= change this client only, not a Resilience it was given.
        self.resilience = dataclasses.replace(resilience) if resilience else Resilience()
        if retry is not None:
            self.resilience.retry = retry
        if breaker is not None:
            self.resilience.breaker = breaker
        #: Reconnections a subscription may make in a row without receiving anything, before
        #: it gives up (None: never give up).
        self.reconnect_limit = reconnect_limit
        if token is None:
            token = os.environ.get("BACKCHANNEL_TOKEN") or None
        self._token = token

    # -- auth ---------------------------------------------------------------------------------

    @property
    def refreshable(self) -> bool:
        """Does the token come from a function, so that a new connection may get a new one?
        Subscriptions whose token expires then reconnect instead of raising."""
        return callable(self._token)

    def bearer(self) -> str | None:
        """The token to send now, if any."""
        token = self._token
        return token() if callable(token) else token

    def auth_headers(self) -> dict[str, str]:
        token = self.bearer()
        return {"authorization": f"Bearer {token}"} if token else {}

    def __repr__(self) -> str:  # never shows the token
        return f"{type(self).__name__}({self.url!r})"

    # -- calls --------------------------------------------------------------------------------

    def publish_call(
        self,
        channel: str,
        data: Any,
        content: bytes | str | None,
        content_type: str | None,
        idempotency_key: str | None,
    ) -> Call:
        body, kind = body_of(data, content, content_type)
        # A key makes a retried publish return the first result: with one, retrying is safe.
        key = idempotency_key if idempotency_key is not None else uuid.uuid4().hex
        return Call(
            "POST",
            channel_path(channel, "/messages"),
            safe=True,
            headers={"content-type": kind, "idempotency-key": key},
            content=body,
        )

    def poll_call(
        self, channel: str, after: str | None, limit: int | None, wait: float | None
    ) -> Call:
        params: dict[str, str] = {}
        if after is not None:
            params["after"] = after
        if limit is not None:
            params["limit"] = str(limit)
        timeout = None
        if wait:
            params["wait"] = f"{wait:g}"
            timeout = self._longer(wait)
        return Call("GET", channel_path(channel, "/messages"), True, params, timeout=timeout)

    def info_call(self, channel: str) -> Call:
        return Call("GET", channel_path(channel), True)

    # -- jobs ---------------------------------------------------------------------------------

    def submit_call(
        self,
        queue: str,
        payload: Any,
        idempotency_key: str | None,
        max_attempts: int | None,
        wait: float | None,
    ) -> Call:
        headers = {
            "content-type": "application/json",
            # As for publishes: a key makes a retried submit return the same job.
            "idempotency-key": idempotency_key or uuid.uuid4().hex,
        }
        timeout = None
        if wait:
            headers["prefer"] = f"wait={wait:g}"
            timeout = self._longer(wait)
        params = {"max_attempts": str(max_attempts)} if max_attempts is not None else {}
        path = f"/v1/queues/{quote(queue, safe='')}/jobs"
        return Call("POST", path, True, params, headers, orjson.dumps(payload), timeout)

    def job_call(self, job_id: str, wait: float | None, version: int | None) -> Call:
        params: dict[str, str] = {}
        timeout = None
        if wait:
            params["wait"] = f"{wait:g}"
            timeout = self._longer(wait)
        if version is not None:
            params["version"] = str(version)
        return Call("GET", f"/v1/jobs/{quote(job_id, safe='')}", True, params, timeout=timeout)

    def cancel_call(self, job_id: str) -> Call:
        return Call("DELETE", f"/v1/jobs/{quote(job_id, safe='')}", True)

    def claim_call(self, queue: str, wait: float, lease: float | None) -> Call:
        params = {"wait": f"{wait:g}"}
        if lease is not None:
            params["lease"] = f"{lease:g}"
        # Not retried: a claim whose answer was lost leaves a job leased to nobody until the
        # lease runs out, and a second claim would take another job meanwhile.
        path = f"/v1/queues/{quote(queue, safe='')}/claim"
        return Call("POST", path, False, params, timeout=self._longer(wait))

    def worker_call(self, job_id: str, action: str, body: dict[str, Any]) -> Call:
        # A heartbeat or progress report can be repeated; a completion or failure is final.
        safe = action in ("heartbeat", "progress")
        path = f"/v1/jobs/{quote(job_id, safe='')}/{action}"
        headers = {"content-type": "application/json"}
        return Call("POST", path, safe, headers=headers, content=orjson.dumps(body))

    def submit_batch_call(
        self,
        queue: str,
        payloads: Sequence[Any],
        keys: Sequence[str],
        max_attempts: int | None,
    ) -> Call:
        items: list[dict[str, Any]] = [
            {"payload": payload, "idempotency_key": key}
            for payload, key in zip(payloads, keys, strict=True)
        ]
        if max_attempts is not None:
            for item in items:
                item["max_attempts"] = max_attempts
        path = f"/v1/queues/{quote(queue, safe='')}/jobs/batch"
        headers = {"content-type": "application/json"}
        # Safe to send again: every item carries an Idempotency-Key.
        return Call("POST", path, True, headers=headers, content=orjson.dumps({"jobs": items}))

    @staticmethod
    def batch_keys(count: int, keys: Sequence[str] | None) -> list[str]:
        """The items' idempotency keys: the caller's, or new unique ones."""
        if keys is not None:
            if len(keys) != count:
                raise ValueError("give one idempotency key per payload")
            return list(keys)
        prefix = uuid.uuid4().hex
        return [f"{prefix}-{i}" for i in range(count)]

    def submitted_batch(self, response: httpx.Response) -> list[Job | HubError]:
        """Per item of a batch submit: the job, or the hub's refusal."""
        document = self.json_of(response)
        try:
            return [
                Job.from_document(item["job"]) if "job" in item else _item_error(item)
                for item in document["jobs"]
            ]
        except (KeyError, TypeError) as exc:
            raise ProtocolViolation(f"not a batch answer: {str(document)[:200]}") from exc

    def claim_many_call(self, queue: str, limit: int, wait: float, lease: float | None) -> Call:
        call = self.claim_call(queue, wait, lease)
        return dataclasses.replace(call, params={**call.params, "max": str(limit)})

    def claimed_batch(self, response: httpx.Response) -> list[Job]:
        document = self.json_of(response)
        try:
            return [Job.from_document(item) for item in document["jobs"]]
        except (KeyError, TypeError) as exc:
            raise ProtocolViolation(f"not a claim answer: {str(document)[:200]}") from exc

    def finish_call(self, queue: str, outcomes: Sequence[Completion | Failure]) -> Call:
        items: list[dict[str, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, Completion):
                items.append(
                    {"id": outcome.job.id, "lease": outcome.job.lease, "result": outcome.result}
                )
            else:
                items.append(
                    {
                        "id": outcome.job.id,
                        "lease": outcome.job.lease,
                        "error": outcome.error,
                        "retry": outcome.retry,
                    }
                )
        path = f"/v1/queues/{quote(queue, safe='')}/results"
        headers = {"content-type": "application/json"}
        # Not retried, as a single completion: the answer to a repeat would be lease-lost.
        return Call("POST", path, False, headers=headers, content=orjson.dumps({"results": items}))

    def finished_batch(self, response: httpx.Response) -> list[Finished]:
        document = self.json_of(response)
        try:
            return [
                Finished(id=item["id"], state=item["state"], version=item["version"])
                if "problem" not in item
                else Finished(id=item["id"], error=_item_error(item))
                for item in document["results"]
            ]
        except (KeyError, TypeError) as exc:
            raise ProtocolViolation(f"not a results answer: {str(document)[:200]}") from exc

    def watch_request(self, ids: Sequence[str], changes: str, wait: float | None) -> Call:
        read = STREAM_READ_TIMEOUT if wait is None else max(0.001, min(wait, STREAM_READ_TIMEOUT))
        timeout = httpx.Timeout(self.timeout.connect, read=read, write=self.timeout.write)
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        body = orjson.dumps({"ids": list(ids), "changes": changes})
        return Call("POST", "/v1/jobs/events", True, headers=headers, content=body, timeout=timeout)

    def _longer(self, wait: float) -> httpx.Timeout:
        """The client's timeout, with a read long enough for a request the hub holds."""
        read = (self.timeout.read or 0) + wait
        return httpx.Timeout(
            self.timeout.connect, read=read, write=self.timeout.write, pool=self.timeout.pool
        )

    # -- answers ------------------------------------------------------------------------------

    def outcome(self, response: httpx.Response) -> httpx.Response:
        """The response, or :class:`HubError` for an error status."""
        if response.status_code < 400:
            return response
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason_phrase, "detail": response.text[:200]}
        raise hub_error(
            response.status_code, problem if isinstance(problem, dict) else {}, response.headers
        )

    @staticmethod
    def json_of(response: httpx.Response) -> Any:
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise ProtocolViolation(f"the hub answered with invalid JSON: {exc}") from None

    def published(self, response: httpx.Response) -> Published:
        document = self.json_of(response)
        try:
            return Published(
                id=document["id"],
                channel=document["channel"],
                time=document["time"],
                replayed=response.headers.get("idempotent-replayed") == "true",
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolViolation(f"not a publish result: {document!r:.200}") from exc

    def page(self, response: httpx.Response) -> Page:
        document = self.json_of(response)
        try:
            messages = [Message.from_document(m) for m in document["messages"]]
            return Page(messages, document["next_after"])
        except (KeyError, TypeError) as exc:
            raise ProtocolViolation(f"not a page: {str(document)[:200]}") from exc


def _item_error(item: Any) -> HubError:
    problem = item["problem"]
    return HubError(int(item["status"]), problem if isinstance(problem, dict) else {})
