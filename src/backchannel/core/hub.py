"""The hub: publishing to channels, reading them, and waiting for what comes next.

The hub owns no durable state. Messages, sequence numbers, retention policies and idempotency
keys live in the :class:`~backchannel.core.store.Store`; the hub keeps only what is local to
this process: who is waiting on which channel, and reads that are in flight.

Long polls on one channel that wake together share one store read (keyed by channel, cursor
and limit), so a single publish releasing a thousand waiters costs one read, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..wire import InvalidPayload, format_id
from ..wire.payload import normalize_content_type, validate_payload
from .channels import Retention, check_retention, validate_channel
from .errors import InvalidRequest, TooBusy, Unavailable
from .fanout import CloseReason, FanOut, Sink, Subscription
from .messages import Appended, Draft, Message
from .store import Store

__all__ = ["ChannelInfo", "Hub", "Limits", "Page"]

log = logging.getLogger("backchannel.hub")

MAX_IDEMPOTENCY_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Sizes and counts the hub enforces, each with a safe default."""

    max_message_bytes: int = 1 << 20
    default_limit: int = 100
    max_limit: int = 1000
    max_read_bytes: int = 4 << 20
    max_wait: float = 60.0
    max_long_polls: int = 10_000
    sweep_interval: float = 60.0
    max_outbound_bytes: int = 1 << 20
    max_coalesce_delay: float = 0.005


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[Message]
    next_after: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelInfo:
    channel: str
    last_id: str
    first_id: str | None
    retained: int
    retention: Retention
    subscribers: dict[str, int]


def check_idempotency_key(key: str) -> None:
    """Refuse an Idempotency-Key that is empty, too long, or not visible ASCII."""
    # Visible ASCII is "!" to "~": printable ASCII but the space.
    if (
        not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH
        or not (key.isascii() and key.isprintable())
        or " " in key
    ):
        raise InvalidRequest(
            "invalid-idempotency-key",
            f"an Idempotency-Key is 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters",
        )


class Hub:
    def __init__(
        self,
        store: Store,
        *,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        self._clock = clock
        self._waiters: dict[str, set[asyncio.Future[int]]] = {}
        self._inflight: dict[tuple[str, int, int], asyncio.Future[list[Message]]] = {}
        self._subscribers: dict[str, Counter[str]] = {}
        self.fanout = FanOut(
            self._replay_read,
            max_outbound_bytes=self.limits.max_outbound_bytes,
            max_coalesce_delay=self.limits.max_coalesce_delay,
        )
        self._long_polls = 0
        self._started = False
        self._closing = False
        self._sweeper: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        await self.store.open()
        self.store.add_listener(self._on_appended)
        self.store.add_resync_listener(self._on_resync)
        self._started = True
        self._closing = False
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="backchannel-sweeper")

    def begin_shutdown(self) -> None:
        """Release every long poll now (with what it has), end every push subscription, and
        refuse new ones."""
        self._closing = True
        self.fanout.close_all(CloseReason.SHUTTING_DOWN)
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(-1)

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._started:
            self._started = False
            await self.store.close()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def closing(self) -> bool:
        return self._closing

    async def ready(self) -> None:
        """Raise :class:`Unavailable` unless the hub can take requests."""
        if not self._started or self._closing:
            raise Unavailable("the hub is not running")
        try:
            await self.store.ping()
        except Exception as exc:
            raise Unavailable(f"the store does not answer: {exc}") from exc

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- publishing ---------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        content_type: str | None = None,
        idempotency_key: str | None = None,
    ) -> Appended:
        validate_channel(channel)
        if len(data) > self.limits.max_message_bytes:
            # Callers reading a body should stop earlier; this guards every other path.
            raise InvalidRequest(
                "message-too-large",
                f"the message has {len(data)} bytes; the limit is {self.limits.max_message_bytes}",
            )
        try:
            content_type = normalize_content_type(content_type)
            validate_payload(content_type, data)
        except InvalidPayload as exc:
            raise InvalidRequest(exc.kind, exc.detail) from None
        digest = b""
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
            digest = hashlib.sha256(content_type.encode() + b"\0" + data).digest()[:16]
        self._check_open()
        draft = Draft(
            content_type=content_type, data=data, idempotency_key=idempotency_key, digest=digest
        )
        return await self.store.append(channel, draft, now_ms=self.now_ms())

    # -- reading ------------------------------------------------------------------------------

    def check_limit(self, limit: int | None) -> int:
        if limit is None:
            return self.limits.default_limit
        if not 1 <= limit <= self.limits.max_limit:
            raise InvalidRequest(
                "limit-out-of-range", f"limit must be between 1 and {self.limits.max_limit}"
            )
        return limit

    def check_wait(self, wait: float) -> float:
        if not 0 <= wait <= self.limits.max_wait:
            raise InvalidRequest(
                "wait-out-of-range",
                f"wait must be between 0 and {self.limits.max_wait:g} seconds",
            )
        return wait

    async def poll(
        self, channel: str, *, after: int = 0, limit: int | None = None, wait: float = 0.0
    ) -> Page:
        """Messages after ``after``. With ``wait`` > 0 and nothing to return yet, wait up to
        ``wait`` seconds for the first new message (a long poll)."""
        validate_channel(channel)
        limit = self.check_limit(limit)
        wait = self.check_wait(wait)
        self._check_open()
        if wait == 0:
            return await self._page(channel, after, limit)
        if self._long_polls >= self.limits.max_long_polls:
            raise TooBusy(
                f"{self._long_polls} long polls are waiting, the configured maximum; retry shortly"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self._long_polls += 1
        try:
            with self.subscribed(channel, "longpoll"):
                return await self._wait_page(channel, after, limit, deadline)
        finally:
            self._long_polls -= 1

    async def _wait_page(self, channel: str, after: int, limit: int, deadline: float) -> Page:
        loop = asyncio.get_running_loop()
        while True:
            # Register before reading, so a publish landing between the read and the wait
            # still wakes us.
            woken: asyncio.Future[int] = loop.create_future()
            waiters = self._waiters.setdefault(channel, set())
            waiters.add(woken)
            try:
                page = await self._page(channel, after, limit)
                remaining = deadline - loop.time()
                if page.messages or self._closing or remaining <= 0:
                    return page
                try:
                    async with asyncio.timeout(remaining):
                        await woken
                except TimeoutError:
                    return page
                if self._closing:
                    return page
            finally:
                waiters.discard(woken)
                if not waiters and self._waiters.get(channel) is waiters:
                    del self._waiters[channel]

    async def _page(self, channel: str, after: int, limit: int) -> Page:
        messages = await self._read_shared(channel, after, limit)
        next_after = messages[-1].seq if messages else after
        return Page(messages, format_id(next_after))

    async def _read_shared(self, channel: str, after: int, limit: int) -> list[Message]:
        key = (channel, after, limit)
        shared = self._inflight.get(key)
        if shared is None:
            shared = asyncio.ensure_future(
                self.store.read(
                    channel,
                    after=after,
                    limit=limit,
                    max_bytes=self.limits.max_read_bytes,
                    now_ms=self.now_ms(),
                )
            )
            self._inflight[key] = shared
            shared.add_done_callback(lambda done: self._read_done(key, done))
        return await asyncio.shield(shared)

    def _read_done(self, key: tuple[str, int, int], done: asyncio.Future[list[Message]]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved here so that readers who left do not leave it unseen

    async def _replay_read(self, channel: str, after: int, limit: int) -> list[Message]:
        return await self._read_shared(channel, after, limit)

    def _on_appended(self, channel: str, messages: Sequence[Message]) -> None:
        waiters = self._waiters.get(channel)
        if waiters:
            last_seq = messages[-1].seq
            for future in waiters:
                if not future.done():
                    future.set_result(last_seq)
        self.fanout.deliver(channel, messages)

    def _on_resync(self) -> None:
        """Appends may have gone unheard: every long poll reads again, every push subscription
        catches up from its cursor."""
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(-1)
        self.fanout.resync()

    # -- push ---------------------------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        sink: Sink,
        encode: Callable[[Message], bytes],
        *,
        transport: str,
        after: int | None = None,
    ) -> Subscription:
        """Push ``channel`` to ``sink`` (see :mod:`.fanout`): from message ``after`` on,
        replaying history first, or from the next message when ``after`` is None."""
        validate_channel(channel)
        self._check_open()
        return self.fanout.subscribe(channel, sink, encode, transport=transport, after=after)

    def unsubscribe(self, subscription: Subscription) -> None:
        self.fanout.unsubscribe(subscription)

    def attach(self, sink: Sink) -> None:
        """Register a push connection before it subscribes to anything (see FanOut.attach)."""
        self._check_open()
        self.fanout.attach(sink)

    def detach(self, sink: Sink) -> None:
        self.fanout.detach(sink)

    # -- channels -----------------------------------------------------------------------------

    async def info(self, channel: str) -> ChannelInfo:
        validate_channel(channel)
        self._check_open()
        stats = await self.store.stats(channel, now_ms=self.now_ms())
        retention = await self.store.get_retention(channel)
        return ChannelInfo(
            channel=channel,
            last_id=format_id(stats.last_seq),
            first_id=format_id(stats.first_seq) if stats.retained else None,
            retained=stats.retained,
            retention=retention,
            subscribers=dict(self._subscribers.get(channel, {})) | self.fanout.count(channel),
        )

    async def configure(
        self, channel: str, *, max_count: int | None = None, max_age_ms: int | None = None
    ) -> ChannelInfo:
        """Set the channel's own retention limits; ``None`` follows the server's default."""
        validate_channel(channel)
        check_retention(max_count, max_age_ms)
        self._check_open()
        await self.store.set_retention(channel, max_count=max_count, max_age_ms=max_age_ms)
        return await self.info(channel)

    @contextlib.contextmanager
    def subscribed(self, channel: str, transport: str) -> Iterator[None]:
        """Count a subscriber of ``channel`` on ``transport`` for as long as the block runs."""
        counts = self._subscribers.setdefault(channel, Counter())
        counts[transport] += 1
        try:
            yield
        finally:
            counts[transport] -= 1
            if counts[transport] <= 0:
                del counts[transport]
            if not counts and self._subscribers.get(channel) is counts:
                del self._subscribers[channel]

    def statistics(self) -> dict[str, int]:
        return {
            "long_polls": self._long_polls,
            "channels_waited_on": len(self._waiters),
            "reads_in_flight": len(self._inflight),
        }

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._started or self._closing:
            raise Unavailable(
                "the hub is shutting down" if self._closing else "the hub is not running"
            )

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            try:
                removed = await self.store.trim(now_ms=self.now_ms())
            except Exception:
                log.exception("retention sweep failed; will try again")
            else:
                if removed:
                    log.debug("retention sweep removed %d messages", removed)
