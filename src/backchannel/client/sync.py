"""The blocking client: :class:`Client`."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import httpx
import orjson
import websockets.exceptions
import websockets.sync.client

from ..wire import format_id
from ..wire import frames as f
from ..wire.sse import EventParser
from ._base import BATCH_SIZE, WATCH_SIZE, BaseClient, Call, channel_path, translate
from .errors import (
    ClientError,
    HubError,
    HubTimeout,
    HubUnreachable,
    ProtocolViolation,
    hub_error,
)
from .jobs import Completion, Failure, Finished, Job, JobBatchError, JobHandle, Watching
from .models import Message, Page, Published
from .resilience import BreakerState
from .subscription import (
    CLOSE_TOKEN_EXPIRED,
    IDLE_PING,
    TOKEN_EXPIRED,
    Keepalive,
    Resume,
    Spec,
    close_error,
    next_event,
    refused_handshake,
    token_expired,
)


class Client(BaseClient):
    """A blocking client of one hub, over a pool of HTTP connections. Use it as a context
    manager, or call :meth:`close`.

    Every call has a timeout; safe calls (reads, and publishes, which carry an
    ``Idempotency-Key``) are retried with backoff when the hub is unreachable or overloaded; a
    circuit breaker fails fast while the hub keeps failing. See :mod:`.resilience`.
    """

    def __init__(
        self, url: str | None = None, *, sleep: Callable[[float], None] = time.sleep, **options: Any
    ) -> None:
        super().__init__(url or _default_url(), **options)
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, limits=self.limits)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- requests -----------------------------------------------------------------------------

    def _call(self, call: Call) -> httpx.Response:
        resilience = self.resilience
        breaker = resilience.breaker
        attempt = 0
        while True:
            attempt += 1
            if breaker is not None:
                breaker.before_call()
            try:
                response = self.outcome(self._send(call))
            except ClientError as error:
                if breaker is not None:
                    breaker.failed(error)
                    if breaker.state is BreakerState.OPEN:
                        raise  # the breaker just opened: report why, rather than CircuitOpen
                delay = resilience.next_delay(attempt, error, safe=call.safe)
                if delay is None:
                    raise
                self._sleep(delay)
                continue
            if breaker is not None:
                breaker.succeeded()
            return response

    def _send(self, call: Call) -> httpx.Response:
        try:
            return self._http.request(
                call.method,
                call.path,
                params=dict(call.params),
                headers={**call.headers, **self.auth_headers()},
                content=call.content,
                timeout=call.timeout or self.timeout,
            )
        except httpx.HTTPError as exc:
            raise translate(exc, self.url) from exc

    def publish(
        self,
        channel: str,
        data: Any = None,
        *,
        content: bytes | str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """Publish ``data`` as JSON, or raw ``content`` (``str``: text, ``bytes``: binary,
        or with ``content_type``). A unique ``Idempotency-Key`` is added unless you give one,
        so a retried publish is never stored twice."""
        call = self.publish_call(channel, data, content, content_type, idempotency_key)
        return self.published(self._call(call))

    def publish_many(self, channel: str, items: list[Any]) -> list[Published]:
        """Publish each item as JSON, in order, over the pooled connection."""
        return [self.publish(channel, item) for item in items]

    def poll(
        self,
        channel: str,
        *,
        after: str | None = None,
        limit: int | None = None,
        wait: float | None = None,
    ) -> Page:
        """Messages after ``after``; with ``wait``, a long poll of up to that many seconds."""
        return self.page(self._call(self.poll_call(channel, after, limit, wait)))

    def poll_raw(
        self,
        channel: str,
        *,
        after: str | None = None,
        limit: int | None = None,
        wait: float | None = None,
    ) -> bytes:
        """:meth:`poll`'s answer as the hub sent it: JSON bytes."""
        return self._call(self.poll_call(channel, after, limit, wait)).content

    def info(self, channel: str) -> dict[str, Any]:
        info: dict[str, Any] = self.json_of(self._call(self.info_call(channel)))
        return info

    # -- jobs ---------------------------------------------------------------------------------

    def submit(
        self,
        queue: str,
        payload: Any,
        *,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        wait: float | None = None,
    ) -> JobHandle:
        """Submit a job (JSON ``payload``); with ``wait``, the hub holds the answer up to that
        many seconds in case the job finishes (``Prefer: wait``)."""
        call = self.submit_call(queue, payload, idempotency_key, max_attempts, wait)
        return JobHandle(self, Job.from_document(self.json_of(self._call(call))))

    def job(self, job_id: str, *, wait: float | None = None, version: int | None = None) -> Job:
        """The job now; with ``wait``, once its version passes ``version`` (long poll)."""
        return Job.from_document(self.json_of(self._call(self.job_call(job_id, wait, version))))

    def cancel(self, job_id: str) -> Job:
        return Job.from_document(self.json_of(self._call(self.cancel_call(job_id))))

    def claim(self, queue: str, *, wait: float = 30.0, lease: float | None = None) -> Job | None:
        """Workers: the next job of ``queue``, leased to the caller, or None after ``wait``."""
        response = self._call(self.claim_call(queue, wait, lease))
        if response.status_code == 204:
            return None
        return Job.from_document(self.json_of(response))

    def heartbeat(self, job: Job, *, extend: float | None = None) -> Job:
        body: dict[str, Any] = {"lease": job.lease}
        if extend is not None:
            body["extend"] = extend
        return self._worker(job, "heartbeat", body)

    def report_progress(self, job: Job, progress: Any) -> Job:
        return self._worker(job, "progress", {"lease": job.lease, "progress": progress})

    def complete(self, job: Job, result: Any) -> Job:
        return self._worker(job, "complete", {"lease": job.lease, "result": result})

    def fail(self, job: Job, error: str, *, retry: bool = True) -> Job:
        return self._worker(job, "fail", {"lease": job.lease, "error": error, "retry": retry})

    def _worker(self, job: Job, action: str, body: dict[str, Any]) -> Job:
        answer = self.json_of(self._call(self.worker_call(job.id, action, body)))
        return Job.from_document(answer)

    # -- many jobs ----------------------------------------------------------------------------

    def submit_many(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        idempotency_keys: Sequence[str] | None = None,
        max_attempts: int | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> list[JobHandle]:
        """Submit a job per payload, ``batch_size`` per request, and return their handles in
        order. Each job gets an ``Idempotency-Key`` (yours, or a new one), so a batch whose
        answer was lost is sent again without duplicates. Raises :class:`JobBatchError` after
        the last batch if the hub refused some jobs."""
        items = list(payloads)
        keys = self.batch_keys(len(items), idempotency_keys)
        handles: list[JobHandle | None] = []
        errors: dict[int, HubError] = {}
        for start in range(0, len(items), batch_size):
            end = start + batch_size
            call = self.submit_batch_call(queue, items[start:end], keys[start:end], max_attempts)
            for outcome in self.submitted_batch(self._call(call)):
                if isinstance(outcome, HubError):
                    errors[len(handles)] = outcome
                    handles.append(None)
                else:
                    handles.append(JobHandle(self, outcome))
        if errors:
            raise JobBatchError(handles, errors)
        return [handle for handle in handles if handle is not None]

    def as_finished(
        self, handles: Iterable[JobHandle], *, timeout: float | None = None
    ) -> Iterator[Job]:
        """Each job once it has finished, as it finishes (those already finished first), over
        one event stream for up to 10,000 jobs; each handle's ``last`` is updated. Stops after
        ``timeout`` seconds, possibly before every job has finished. The stream is opened again
        (with backoff) when it breaks, for the jobs still waiting: nothing is missed."""
        watching = Watching(handles, self.resilience, self.reconnect_limit)
        yield from watching.finished
        deadline = None if timeout is None else time.monotonic() + timeout
        while watching.waiting:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                for kind, data in self._job_events(watching.next_ids(WATCH_SIZE), "final", left):
                    job = watching.event(kind, data)
                    if job is not None:
                        yield job
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                self._sleep(watching.ended())
            except HubTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                self._sleep(watching.failed(HubTimeout("the stream of jobs went silent")))
            except ClientError as error:
                self._sleep(watching.failed(error))

    def wait_all(self, handles: Iterable[JobHandle], *, timeout: float | None = None) -> list[Job]:
        """The jobs once all have finished, in the order of ``handles``; after ``timeout``
        seconds, the unfinished ones as last seen (each handle's ``last``: as submitted, unless
        polled since). See :meth:`as_finished`."""
        handles = list(handles)
        for _ in self.as_finished(handles, timeout=timeout):
            pass
        return [handle.last for handle in handles]

    def _job_events(
        self, ids: Sequence[str], changes: str, wait: float | None
    ) -> Iterator[tuple[str, str]]:
        call = self.watch_request(ids, changes, wait)
        http = self._http
        request = http.build_request(
            call.method, call.path, headers=dict(call.headers), content=call.content,
            timeout=call.timeout,
        )  # fmt: skip
        try:
            response = http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate(exc, self.url) from exc
        try:
            if response.status_code >= 400:
                response.read()
                self.outcome(response)
            parser = EventParser()
            for chunk in response.iter_raw():
                parser.receive_data(chunk)
                for event in parser.events():
                    yield event.event, event.data
        except httpx.HTTPError as exc:
            raise translate(exc, self.url) from exc
        finally:
            response.close()

    def claim_many(
        self, queue: str, *, limit: int, wait: float = 30.0, lease: float | None = None
    ) -> list[Job]:
        """Workers: up to ``limit`` jobs of ``queue``, each leased to the caller, in one
        request; waiting up to ``wait`` seconds for the first. Empty if none came."""
        return self.claimed_batch(self._call(self.claim_many_call(queue, limit, wait, lease)))

    def finish_many(self, queue: str, outcomes: Sequence[Completion | Failure]) -> list[Finished]:
        """Workers: complete or fail many jobs of ``queue`` in one request. Each item succeeds
        or fails on its own: the answer has a :class:`Finished` per item, in order."""
        if not outcomes:
            return []
        return self.finished_batch(self._call(self.finish_call(queue, outcomes)))

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        *,
        via: str = "sse",
        after: str | None = None,
        wait: float = 30.0,
        interval: float = 1.0,
    ) -> Subscription:
        """An iterator of the channel's messages after ``after`` (default: from now), over
        ``via``: ``"sse"``, ``"ws"``, ``"tcp"``, ``"longpoll"`` (``wait`` seconds a request) or
        ``"poll"`` (every ``interval`` seconds). It reconnects by itself and resumes after the
        last message it yielded: nothing is lost or repeated."""
        return Subscription(self, Spec(channel, via, after, wait, interval))


class Subscription(Iterator[Message]):
    def __init__(self, client: Client, spec: Spec) -> None:
        self.client = client
        self.spec = spec
        self.channel = spec.channel
        self.resume = Resume(client.resilience, client.reconnect_limit)
        self._stream: Iterator[Message] | None = None
        self._closer: Callable[[], None] | None = None
        self._closed = False

    def __iter__(self) -> Subscription:
        return self

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            with contextlib.suppress(Exception):
                closer()
        self._stream = None

    def __next__(self) -> Message:
        while not self._closed:
            try:
                if self._stream is None:
                    if self.resume.cursor is None:
                        start = self.spec.after or self.client.info(self.channel)["last_id"]
                        self.resume.start(start)
                    self._stream = self._open(self.resume.after())
                message = next(self._stream)
            except StopIteration:
                self._drop()
                self.client._sleep(self.resume.ended())
                continue
            except ClientError as error:
                self._drop()
                self.client._sleep(self.resume.failed(error))  # raises when it gives up
                continue
            if self.resume.accept(message):
                return message
        raise StopIteration

    def _open(self, after: int) -> Iterator[Message]:
        opener = {
            "sse": self._sse,
            "ws": self._ws,
            "tcp": self._tcp,
            "longpoll": self._longpoll,
            "poll": self._poll,
        }[self.spec.via]
        return opener(after)

    def _sse(self, after: int) -> Iterator[Message]:
        http = self.client._http
        request = http.build_request(
            "GET",
            channel_path(self.channel, "/events"),
            headers={
                "last-event-id": format_id(after),
                "accept": "text/event-stream",
                **self.client.auth_headers(),
            },
            timeout=httpx.Timeout(self.client.timeout.connect, read=60.0),
        )
        try:
            response = http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate(exc, self.client.url) from exc
        self._closer = response.close
        if response.status_code >= 400:
            response.read()
            self.client.outcome(response)
        parser = EventParser()
        try:
            for chunk in response.iter_raw():
                parser.receive_data(chunk)
                for event in parser.events():
                    if event.event == "message":
                        yield Message.from_document(_json(event.data))
                    elif event.event == TOKEN_EXPIRED:
                        if self.client.refreshable:
                            return  # reconnect with a new token
                        raise token_expired(_json(event.data))
        except httpx.HTTPError as exc:
            raise translate(exc, self.client.url) from exc
        finally:
            response.close()
        if parser.retry is not None:
            self.resume.server_retry = parser.retry / 1000

    def _ws(self, after: int) -> Iterator[Message]:
        url = f"{self.client.ws_url}{channel_path(self.channel, '/ws')}?after={format_id(after)}"
        try:
            opened = websockets.sync.client.connect(
                url,
                open_timeout=self.client.timeout.connect,
                max_size=None,
                additional_headers=self.client.auth_headers(),
            )
        except websockets.exceptions.InvalidStatus as exc:
            raise refused_handshake(exc.response.status_code, exc.response.body, url) from exc
        except (OSError, websockets.exceptions.WebSocketException) as exc:
            raise HubUnreachable(f"cannot open {url}: {exc}") from exc
        with opened as connection:
            self._closer = connection.close
            while True:
                # No read timeout: the library's keepalive pings find a dead connection.
                try:
                    raw = connection.recv()
                except websockets.exceptions.ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd else 1006
                    if code == CLOSE_TOKEN_EXPIRED and self.client.refreshable:
                        return  # reconnect with a new token
                    raise close_error(code, exc.rcvd.reason if exc.rcvd else "") from exc
                yield Message.from_document(_json(raw))

    def _tcp(self, after: int) -> Iterator[Message]:
        address = (self.client.host, self.client.tcp_port)
        try:
            sock = socket.create_connection(address, timeout=self.client.timeout.connect)
        except OSError as exc:
            raise HubUnreachable(f"cannot connect to {address}: {exc}") from exc
        self._closer = sock.close
        sock.settimeout(IDLE_PING)
        codec = f.Connection(f.Role.CLIENT)
        keepalive = Keepalive()

        def next_frame() -> f.Event:
            while (event := next_event(codec)) is f.NEED_DATA:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    if codec.state is not f.State.OPEN:
                        raise HubUnreachable("the hub did not answer HELLO") from None
                    sock.sendall(codec.send(keepalive.ping()))  # raises once one went unanswered
                    continue
                except OSError as exc:
                    raise HubUnreachable(f"the TCP connection broke: {exc}") from exc
                keepalive.heard()
                codec.receive_data(data)
            return event

        try:
            sock.sendall(codec.send(f.Hello(versions=f.VERSIONS)))
            if not isinstance(next_frame(), f.Welcome):
                raise ProtocolViolation("the hub did not answer HELLO with WELCOME")
            sock.sendall(b"".join(tcp_opening(codec, self.client.bearer(), self.channel, after)))
            while True:
                event = next_frame()
                if isinstance(event, f.Message):
                    yield Message.from_frame(
                        event.channel, event.seq, event.time_ms, event.content_type, event.data
                    )
                elif isinstance(event, f.Error):
                    if tcp_expired(event) and self.client.refreshable:
                        return  # reconnect with a new token
                    raise tcp_error(event)
                elif event is f.CONNECTION_CLOSED:
                    return
                # PONG: the keepalive's answer, nothing to yield
        except f.ProtocolError as exc:
            raise ProtocolViolation(f"TCP protocol error: {exc}") from exc
        except OSError as exc:
            raise HubUnreachable(f"the TCP connection broke: {exc}") from exc
        finally:
            sock.close()

    def _longpoll(self, after: int) -> Iterator[Message]:
        cursor = format_id(after)
        while True:
            page = self.client.poll(self.channel, after=cursor, wait=self.spec.wait)
            yield from page.messages
            cursor = page.next_after

    def _poll(self, after: int) -> Iterator[Message]:
        cursor = format_id(after)
        while True:
            page = self.client.poll(self.channel, after=cursor)
            yield from page.messages
            cursor = page.next_after
            if not page.messages:
                self.client._sleep(self.spec.interval)


#: The HTTP status a TCP ERROR's type stands for, where it is not 400.
_TCP_STATUSES = {
    "token-required": 401,
    "invalid-token": 401,
    "token-expired": 401,
    "forbidden": 403,
}


def tcp_opening(codec: f.Connection, token: str | None, channel: str, after: int) -> list[bytes]:
    """What a TCP subscription sends once WELCOME came: AUTH with its token (if it has one),
    then SUBSCRIBE. The hub answers in order, so the subscription need not wait for the OK."""
    out = []
    request = 1
    if token:
        if (codec.version or 0) < f.AUTH_VERSION:
            raise ProtocolViolation(
                f"the hub speaks TCP protocol version {codec.version}, which cannot carry a token"
            )
        out.append(codec.send(f.Auth(request=request, token=token)))
        request += 1
    out.append(codec.send(f.Subscribe(request=request, channel=channel, after=after)))
    return out


def tcp_expired(event: f.Error) -> bool:
    return event.request == 0 and event.type == TOKEN_EXPIRED


def tcp_error(event: f.Error) -> ClientError:
    """A TCP ERROR frame as the exception it stands for."""
    if event.request == 0 and event.type in ("slow-consumer", "shutting-down"):
        return HubUnreachable(f"the hub ended the connection: {event.type}")
    return hub_error(
        _TCP_STATUSES.get(event.type, 400),
        {"type": f"/problems/{event.type}", "title": event.type, "detail": event.detail},
    )


def _json(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(f"the hub sent invalid JSON: {exc}") from None


def _default_url() -> str:
    import os

    from ._base import DEFAULT_URL

    return os.environ.get("BACKCHANNEL_URL", DEFAULT_URL)
