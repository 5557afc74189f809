"""The asyncio client: :class:`AsyncClient`, the twin of :class:`~.sync.Client`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import httpx
import websockets.asyncio.client
import websockets.exceptions

from ..wire import format_id
from ..wire import frames as f
from ..wire.sse import EventParser
from ._base import BATCH_SIZE, WATCH_SIZE, BaseClient, Call, channel_path, translate
from .errors import ClientError, HubError, HubTimeout, HubUnreachable, ProtocolViolation
from .jobs import (
    AsyncJobHandle,
    Completion,
    Failure,
    Finished,
    Job,
    JobBatchError,
    Watching,
)
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
from .sync import _default_url, _json, tcp_error, tcp_expired, tcp_opening


class AsyncClient(BaseClient):
    """The same calls as :class:`~.sync.Client`, as coroutines. Use ``async with``, or
    ``await client.aclose()``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        **options: Any,
    ) -> None:
        super().__init__(url or _default_url(), **options)
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=self.limits)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: Call) -> httpx.Response:
        resilience = self.resilience
        breaker = resilience.breaker
        attempt = 0
        while True:
            attempt += 1
            if breaker is not None:
                breaker.before_call()
            try:
                response = self.outcome(await self._send(call))
            except ClientError as error:
                if breaker is not None:
                    breaker.failed(error)
                    if breaker.state is BreakerState.OPEN:
                        raise  # the breaker just opened: report why, rather than CircuitOpen
                delay = resilience.next_delay(attempt, error, safe=call.safe)
                if delay is None:
                    raise
                await self._sleep(delay)
                continue
            if breaker is not None:
                breaker.succeeded()
            return response

    async def _send(self, call: Call) -> httpx.Response:
        try:
            return await self._http.request(
                call.method,
                call.path,
                params=dict(call.params),
                headers={**call.headers, **self.auth_headers()},
                content=call.content,
                timeout=call.timeout or self.timeout,
            )
        except httpx.HTTPError as exc:
            raise translate(exc, self.url) from exc

    async def publish(
        self,
        channel: str,
        data: Any = None,
        *,
        content: bytes | str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
    ) -> Published:
        call = self.publish_call(channel, data, content, content_type, idempotency_key)
        return self.published(await self._call(call))

    async def publish_many(
        self, channel: str, items: list[Any], *, concurrency: int = 16
    ) -> list[Published]:
        """Publish each item as JSON, up to ``concurrency`` at a time over the pool. The hub
        orders them as they arrive: use :meth:`publish` in a loop when order matters."""
        slots = asyncio.Semaphore(concurrency)

        async def one(item: Any) -> Published:
            async with slots:
                return await self.publish(channel, item)

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def poll(
        self,
        channel: str,
        *,
        after: str | None = None,
        limit: int | None = None,
        wait: float | None = None,
    ) -> Page:
        return self.page(await self._call(self.poll_call(channel, after, limit, wait)))

    async def poll_raw(
        self,
        channel: str,
        *,
        after: str | None = None,
        limit: int | None = None,
        wait: float | None = None,
    ) -> bytes:
        return (await self._call(self.poll_call(channel, after, limit, wait))).content

    async def info(self, channel: str) -> dict[str, Any]:
        info: dict[str, Any] = self.json_of(await self._call(self.info_call(channel)))
        return info

    async def submit(
        self,
        queue: str,
        payload: Any,
        *,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        wait: float | None = None,
    ) -> AsyncJobHandle:
        call = self.submit_call(queue, payload, idempotency_key, max_attempts, wait)
        return AsyncJobHandle(self, Job.from_document(self.json_of(await self._call(call))))

    async def job(
        self, job_id: str, *, wait: float | None = None, version: int | None = None
    ) -> Job:
        response = await self._call(self.job_call(job_id, wait, version))
        return Job.from_document(self.json_of(response))

    async def cancel(self, job_id: str) -> Job:
        return Job.from_document(self.json_of(await self._call(self.cancel_call(job_id))))

    async def claim(
        self, queue: str, *, wait: float = 30.0, lease: float | None = None
    ) -> Job | None:
        response = await self._call(self.claim_call(queue, wait, lease))
        if response.status_code == 204:
            return None
        return Job.from_document(self.json_of(response))

    async def heartbeat(self, job: Job, *, extend: float | None = None) -> Job:
        body: dict[str, Any] = {"lease": job.lease}
        if extend is not None:
            body["extend"] = extend
        return await self._worker(job, "heartbeat", body)

    async def report_progress(self, job: Job, progress: Any) -> Job:
        return await self._worker(job, "progress", {"lease": job.lease, "progress": progress})

    async def complete(self, job: Job, result: Any) -> Job:
        return await self._worker(job, "complete", {"lease": job.lease, "result": result})

    async def fail(self, job: Job, error: str, *, retry: bool = True) -> Job:
        body = {"lease": job.lease, "error": error, "retry": retry}
        return await self._worker(job, "fail", body)

    async def _worker(self, job: Job, action: str, body: dict[str, Any]) -> Job:
        answer = self.json_of(await self._call(self.worker_call(job.id, action, body)))
        return Job.from_document(answer)

    # -- many jobs ----------------------------------------------------------------------------

    async def submit_many(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        idempotency_keys: Sequence[str] | None = None,
        max_attempts: int | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> list[AsyncJobHandle]:
        """See :meth:`.sync.Client.submit_many`."""
        items = list(payloads)
        keys = self.batch_keys(len(items), idempotency_keys)
        handles: list[AsyncJobHandle | None] = []
        errors: dict[int, HubError] = {}
        for start in range(0, len(items), batch_size):
            end = start + batch_size
            call = self.submit_batch_call(queue, items[start:end], keys[start:end], max_attempts)
            for outcome in self.submitted_batch(await self._call(call)):
                if isinstance(outcome, HubError):
                    errors[len(handles)] = outcome
                    handles.append(None)
                else:
                    handles.append(AsyncJobHandle(self, outcome))
        if errors:
            raise JobBatchError(handles, errors)
        return [handle for handle in handles if handle is not None]

    async def as_finished(
        self,
        handles: Iterable[AsyncJobHandle],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the twin's API
    ) -> AsyncIterator[Job]:
        """See :meth:`.sync.Client.as_finished`."""
        watching = Watching(handles, self.resilience, self.reconnect_limit)
        for done in watching.finished:
            yield done
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while watching.waiting:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            try:
                ids = watching.next_ids(WATCH_SIZE)
                async for kind, data in self._job_events(ids, "final", left):
                    job = watching.event(kind, data)
                    if job is not None:
                        yield job
                    if deadline is not None and loop.time() >= deadline:
                        return
                await self._sleep(watching.ended())
            except HubTimeout:
                if deadline is not None and loop.time() >= deadline:
                    return
                await self._sleep(watching.failed(HubTimeout("the stream of jobs went silent")))
            except ClientError as error:
                await self._sleep(watching.failed(error))

    async def wait_all(
        self,
        handles: Iterable[AsyncJobHandle],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the twin's API
    ) -> list[Job]:
        """See :meth:`.sync.Client.wait_all`."""
        handles = list(handles)
        async for _ in self.as_finished(handles, timeout=timeout):
            pass
        return [handle.last for handle in handles]

    async def _job_events(
        self, ids: Sequence[str], changes: str, wait: float | None
    ) -> AsyncIterator[tuple[str, str]]:
        call = self.watch_request(ids, changes, wait)
        http = self._http
        request = http.build_request(
            call.method, call.path, headers=dict(call.headers), content=call.content,
            timeout=call.timeout,
        )  # fmt: skip
        try:
            response = await http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate(exc, self.url) from exc
        try:
            if response.status_code >= 400:
                await response.aread()
                self.outcome(response)
            parser = EventParser()
            async for chunk in response.aiter_raw():
                parser.receive_data(chunk)
                for event in parser.events():
                    yield event.event, event.data
        except httpx.HTTPError as exc:
            raise translate(exc, self.url) from exc
        finally:
            await response.aclose()

    async def claim_many(
        self, queue: str, *, limit: int, wait: float = 30.0, lease: float | None = None
    ) -> list[Job]:
        """See :meth:`.sync.Client.claim_many`."""
        call = self.claim_many_call(queue, limit, wait, lease)
        return self.claimed_batch(await self._call(call))

    async def finish_many(
        self, queue: str, outcomes: Sequence[Completion | Failure]
    ) -> list[Finished]:
        """See :meth:`.sync.Client.finish_many`."""
        if not outcomes:
            return []
        return self.finished_batch(await self._call(self.finish_call(queue, outcomes)))

    def subscribe(
        self,
        channel: str,
        *,
        via: str = "sse",
        after: str | None = None,
        wait: float = 30.0,
        interval: float = 1.0,
    ) -> AsyncSubscription:
        """An async iterator of the channel's messages; see :meth:`.sync.Client.subscribe`."""
        return AsyncSubscription(self, Spec(channel, via, after, wait, interval))


class AsyncSubscription(AsyncIterator[Message]):
    def __init__(self, client: AsyncClient, spec: Spec) -> None:
        self.client = client
        self.spec = spec
        self.channel = spec.channel
        self.resume = Resume(client.resilience, client.reconnect_limit)
        self._stream: AsyncIterator[Message] | None = None
        self._closed = False

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def __anext__(self) -> Message:
        while not self._closed:
            try:
                if self._stream is None:
                    if self.resume.cursor is None:
                        start = self.spec.after or (await self.client.info(self.channel))["last_id"]
                        self.resume.start(start)
                    self._stream = self._open(self.resume.after())
                message = await anext(self._stream)
            except StopAsyncIteration:
                await self._drop()
                await self.client._sleep(self.resume.ended())
                continue
            except ClientError as error:
                await self._drop()
                await self.client._sleep(self.resume.failed(error))
                continue
            if self.resume.accept(message):
                return message
        raise StopAsyncIteration

    def _open(self, after: int) -> AsyncIterator[Message]:
        opener = {
            "sse": self._sse,
            "ws": self._ws,
            "tcp": self._tcp,
            "longpoll": self._longpoll,
            "poll": self._poll,
        }[self.spec.via]
        return opener(after)

    async def _sse(self, after: int) -> AsyncIterator[Message]:
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
            response = await http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate(exc, self.client.url) from exc
        try:
            if response.status_code >= 400:
                await response.aread()
                self.client.outcome(response)
            parser = EventParser()
            try:
                async for chunk in response.aiter_raw():
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
            if parser.retry is not None:
                self.resume.server_retry = parser.retry / 1000
        finally:
            await response.aclose()

    async def _ws(self, after: int) -> AsyncIterator[Message]:
        url = f"{self.client.ws_url}{channel_path(self.channel, '/ws')}?after={format_id(after)}"
        try:
            connection = await websockets.asyncio.client.connect(
                url,
                open_timeout=self.client.timeout.connect,
                max_size=None,
                additional_headers=self.client.auth_headers(),
            )
        except websockets.exceptions.InvalidStatus as exc:
            raise refused_handshake(exc.response.status_code, exc.response.body, url) from exc
        except (OSError, websockets.exceptions.WebSocketException) as exc:
            raise HubUnreachable(f"cannot open {url}: {exc}") from exc
        try:
            while True:
                # No read timeout: the library's keepalive pings find a dead connection.
                try:
                    raw = await connection.recv()
                except websockets.exceptions.ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd else 1006
                    if code == CLOSE_TOKEN_EXPIRED and self.client.refreshable:
                        return  # reconnect with a new token
                    raise close_error(code, exc.rcvd.reason if exc.rcvd else "") from exc
                yield Message.from_document(_json(raw))
        finally:
            await connection.close()

    async def _tcp(self, after: int) -> AsyncIterator[Message]:
        try:
            async with asyncio.timeout(self.client.timeout.connect):
                reader, writer = await asyncio.open_connection(
                    self.client.host, self.client.tcp_port
                )
        except (OSError, TimeoutError) as exc:
            raise HubUnreachable(f"cannot connect over TCP: {exc}") from exc
        codec = f.Connection(f.Role.CLIENT)
        keepalive = Keepalive()

        async def next_frame() -> f.Event:
            while (event := next_event(codec)) is f.NEED_DATA:
                try:
                    async with asyncio.timeout(IDLE_PING):
                        data = await reader.read(65536)
                except TimeoutError:
                    if codec.state is not f.State.OPEN:
                        raise HubUnreachable("the hub did not answer HELLO") from None
                    writer.write(codec.send(keepalive.ping()))  # raises once one went unanswered
                    continue
                except OSError as exc:
                    raise HubUnreachable(f"the TCP connection broke: {exc}") from exc
                keepalive.heard()
                codec.receive_data(data)
            return event

        try:
            writer.write(codec.send(f.Hello(versions=f.VERSIONS)))
            if not isinstance(await next_frame(), f.Welcome):
                raise ProtocolViolation("the hub did not answer HELLO with WELCOME")
            writer.write(b"".join(tcp_opening(codec, self.client.bearer(), self.channel, after)))
            while True:
                event = await next_frame()
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
        except f.ProtocolError as exc:
            raise ProtocolViolation(f"TCP protocol error: {exc}") from exc
        finally:
            writer.close()

    async def _longpoll(self, after: int) -> AsyncIterator[Message]:
        cursor = format_id(after)
        while True:
            page = await self.client.poll(self.channel, after=cursor, wait=self.spec.wait)
            for message in page.messages:
                yield message
            cursor = page.next_after

    async def _poll(self, after: int) -> AsyncIterator[Message]:
        cursor = format_id(after)
        while True:
            page = await self.client.poll(self.channel, after=cursor)
            for message in page.messages:
                yield message
            cursor = page.next_after
            if not page.messages:
                await self.client._sleep(self.spec.interval)
