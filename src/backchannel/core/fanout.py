"""The fan-out engine: delivering each new message to every subscriber of its channel.

A :class:`Subscription` joins a channel with a :class:`Sink` (one connection's outbound side)
and a function that gives the message's bytes in the sink's wire format. Those bytes are
cached on the message (see :class:`~backchannel.core.messages.Message`), so a message is
encoded once per wire format however many subscribers it has.

Order and exactly-once are kept per subscription by its cursor, ``last_seq``: a subscription
takes message ``last_seq + 1`` and nothing else. A message it has seen is skipped; a message
after a gap sends it back to the store to read what it missed. So a subscription that starts
from a cursor first replays history from the store while live messages are set aside, and
joins the live stream where the two meet, with no gap and no duplicate, even while publishes
race the replay.

A publish does not walk the subscribers: :meth:`FanOut.deliver` appends the message to its
channel's buffer and schedules a flush, so it costs the same for one subscriber or ten thousand
and the publisher is answered at once. A flush visits each subscriber of a channel with buffered
messages once and writes it everything past its cursor in one write; what was buffered when the
flush began is then let go. The flush runs a slice of :data:`FLUSH_SLICE` subscribers per turn of
the event loop, so publishes (and everything else) are served between slices, and a message
heard during a flush rides along to every subscriber the flush has not reached yet; those
reached before it get it in the next flush. The subscriptions of a multiplexed connection are
visited one after another, in one slice, so the connection gets one write for all its channels.
A subscriber is thus written at most once per flush however fast messages come: under load
every write carries several messages, and the kernel's cost per write, not per byte, is what
limits fan-out.

Between two flushes the engine may wait for more messages: at most as long as the last flush
took and never more than ``max_coalesce_delay``, if it ended less than that cap ago. An engine
that has been idle flushes at once, so a lone message pays no delay.

When the store says notifications may have been lost (:meth:`FanOut.resync`, a shared store
whose link to the others dropped), every subscription with a cursor reads the store again from
it, as on a gap. A subscription that started from "now" and has received nothing yet has no
cursor to read from: it carries on with the next message it hears.

A sink that holds more than ``max_outbound_bytes`` unsent is a slow consumer: it is closed with
reason ``slow-consumer`` and the others go on at full speed. During a replay the engine waits
for the sink to drain instead, since there the engine, not the publishers, sets the pace.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .messages import Message

log = logging.getLogger("backchannel.fanout")

REPLAY_BATCH = 500
#: Live messages set aside during a replay, beyond which they are dropped and read again from
#: the store once the replay gets there.
MAX_SET_ASIDE = 10_000
#: Subscriptions visited per turn of the event loop during a flush: few enough that a publish
#: (or a new subscriber) waits a fraction of a millisecond behind a flush to thousands of
#: subscribers. A publish takes a few turns to reach :meth:`FanOut.deliver`, each behind one
#: slice: at 1,000 subscribers and 200 msg/s, 16 instead of 128 took the median delivery from
#: 12 to under 10 ms at the same CPU (docs/benchmarks.md, "The fan-out engine").
FLUSH_SLICE = 16


class CloseReason(enum.Enum):
    SLOW_CONSUMER = "slow-consumer"
    SHUTTING_DOWN = "shutting-down"
    UNSUBSCRIBED = "unsubscribed"
    FAILED = "failed"
    #: The credentials the connection was opened with ran out (a token's ``exp``).
    TOKEN_EXPIRED = "token-expired"


class Sink(Protocol):
    """One connection's outbound side, as the engine sees it. All methods are non-blocking."""

    def write(self, data: bytes) -> None:
        """Queue ``data``; it goes out at the next :meth:`flush`."""

    def flush(self) -> None:
        """Start sending what is queued."""

    def buffered(self) -> int:
        """Bytes queued or in flight but not yet taken by the peer (as far as is known)."""

    async def drained(self) -> None:
        """Return once :meth:`buffered` is low again (or the sink is closed)."""

    def close(self, reason: CloseReason) -> None:
        """End the connection (or, on a multiplexed one, tell the peer this subscription
        ended) for ``reason``."""

    @property
    def closed(self) -> bool: ...


Reader = Callable[[str, int, int], Awaitable[list[Message]]]


class Subscription:
    __slots__ = (
        "_catching_up",
        "_gone",
        "_set_aside",
        "_set_aside_overflowed",
        "channel",
        "encode",
        "engine",
        "last_seq",
        "sink",
        "transport",
    )

    def __init__(
        self,
        engine: FanOut,
        channel: str,
        sink: Sink,
        encode: Callable[[Message], bytes],
        transport: str,
        after: int | None,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.sink = sink
        self.encode = encode
        self.transport = transport
        #: The last message delivered, or None until the first one for a subscription that
        #: started from "now".
        self.last_seq = after
        self._catching_up: asyncio.Task[None] | None = None
        self._set_aside: list[Message] = []
        self._set_aside_overflowed = False
        #: Unsubscribed: a flush under way skips it.
        self._gone = False

    @property
    def live(self) -> bool:
        return self._catching_up is None

    def offer(self, messages: Sequence[Message]) -> None:
        """Take new messages of the channel, in sequence order."""
        if self._catching_up is not None:
            if len(self._set_aside) + len(messages) > MAX_SET_ASIDE:
                self._set_aside.clear()
                self._set_aside_overflowed = True
            elif not self._set_aside_overflowed:
                self._set_aside.extend(messages)
            return
        last = self.last_seq
        sink = self.sink
        for message in messages:
            seq = message.seq
            if last is not None:
                if seq <= last:
                    continue
                if seq != last + 1:
                    # Missed something (a notification was lost or reordered): read it.
                    self._set_aside = [m for m in messages if m.seq >= seq]
                    self.last_seq = last
                    self._start_catch_up()
                    return
            sink.write(self.encode(message))
            last = seq
        self.last_seq = last
        self.engine.dirty.add(self)

    def _start_catch_up(self) -> None:
        self._catching_up = asyncio.get_running_loop().create_task(self._catch_up())
        self.engine.replaying.setdefault(self.channel, set()).add(self)

    def _end_catch_up(self) -> None:
        self._catching_up = None
        replaying = self.engine.replaying.get(self.channel)
        if replaying is not None:
            replaying.discard(self)
            if not replaying:
                del self.engine.replaying[self.channel]

    async def _catch_up(self) -> None:
        engine = self.engine
        try:
            while not self.sink.closed:
                assert self.last_seq is not None
                batch = await engine.read(self.channel, self.last_seq, REPLAY_BATCH)
                for message in batch:
                    # The store is the authority: its first message may be past the cursor
                    # when retention removed what came between.
                    if message.seq > self.last_seq:
                        self.sink.write(self.encode(message))
                        self.last_seq = message.seq
                if batch:
                    self.sink.flush()
                    if self.sink.buffered() > engine.max_outbound_bytes // 2:
                        await self.sink.drained()
                if len(batch) == REPLAY_BATCH:
                    continue
                # Caught up with the store as of that read: join the live messages set aside,
                # unless some were dropped or a gap remains between the two.
                waiting = [m for m in self._set_aside if m.seq > self.last_seq]
                if self._set_aside_overflowed or (waiting and waiting[0].seq != self.last_seq + 1):
                    self._set_aside_overflowed = False
                    self._set_aside = waiting
                    continue
                self._set_aside = []
                self._end_catch_up()
                if waiting:
                    self.offer(waiting)
                    engine.schedule_flush()
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("replay of %s failed; closing the subscription", self.channel)
            self._end_catch_up()
            self.sink.close(CloseReason.FAILED)

    def resync(self) -> None:
        """Notifications may have been lost: read the store from the cursor again."""
        if self.last_seq is None or self.sink.closed:
            return
        if self._catching_up is not None:
            # The replay may already be past its last read: make it read once more.
            self._set_aside_overflowed = True
            return
        self._start_catch_up()

    def cancel(self) -> None:
        self._gone = True
        if self._catching_up is not None:
            self._catching_up.cancel()
            self._end_catch_up()


class FanOut:
    """Subscriptions by channel, and delivery to them."""

    def __init__(
        self,
        read: Reader,
        *,
        max_outbound_bytes: int = 1 << 20,
        max_coalesce_delay: float = 0.005,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.read = read
        self.max_outbound_bytes = max_outbound_bytes
        self.max_coalesce_delay = max_coalesce_delay
        self._clock = clock
        self._last_flush_cost = 0.0
        self._last_flush_end = float("-inf")
        self.channels: dict[str, set[Subscription]] = {}
        #: Live messages not yet written to every subscriber, by channel: consecutive ids.
        self.pending: dict[str, list[Message]] = {}
        #: Subscriptions replaying history, by channel: they set live messages aside.
        self.replaying: dict[str, set[Subscription]] = {}
        #: Subscriptions with bytes queued outside a flush (the end of a replay).
        self.dirty: set[Subscription] = set()
        self.attached: set[Sink] = set()
        self._flush_scheduled = False
        #: The subscriptions the flush under way visits (a slice at a time), or None.
        self._flushing: list[Subscription] | None = None
        self._flushed = 0
        self._flush_cost = 0.0
        #: The last id of each buffer when the flush under way began.
        self._marks: dict[str, int] = {}
        #: Does the flush under way visit a connection's subscriptions one after another?
        self._grouped = False
        #: Subscriptions per sink, and the sinks with more than one (multiplexed connections).
        self._subscriptions_of: dict[Sink, int] = {}
        self._shared: set[Sink] = set()

    def subscribe(
        self,
        channel: str,
        sink: Sink,
        encode: Callable[[Message], bytes],
        *,
        transport: str,
        after: int | None,
    ) -> Subscription:
        """Start delivering ``channel`` to ``sink``: after message ``after``, replaying history
        first, or from the next message published when ``after`` is None."""
        subscription = Subscription(self, channel, sink, encode, transport, after)
        self.channels.setdefault(channel, set()).add(subscription)
        if after is not None:
            subscription._start_catch_up()
        else:
            # Messages heard before this call but not yet flushed were published before it:
            # "from the next message" starts after them.
            pending = self.pending.get(channel)
            if pending:
                subscription.last_seq = pending[-1].seq
        count = self._subscriptions_of.get(sink, 0) + 1
        self._subscriptions_of[sink] = count
        if count == 2:
            self._shared.add(sink)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.cancel()
        subscribers = self.channels.get(subscription.channel)
        if subscribers is not None and subscription in subscribers:
            subscribers.remove(subscription)
            if not subscribers:
                del self.channels[subscription.channel]
            sink = subscription.sink
            count = self._subscriptions_of[sink] - 1
            if count:
                self._subscriptions_of[sink] = count
            else:
                del self._subscriptions_of[sink]
            if count == 1:
                self._shared.discard(sink)
        self.dirty.discard(subscription)

    def deliver(self, channel: str, messages: Sequence[Message]) -> None:
        """Hand new messages of ``channel`` (in order) to its subscribers.

        Live subscribers take them from the channel's buffer when the next flush reaches them,
        so a publish costs the same for one subscriber or ten thousand, and a subscriber that
        a flush under way has not reached yet gets them in the same write as what it was
        already due."""
        if not messages or channel not in self.channels:
            return
        replaying = self.replaying.get(channel)
        if replaying:
            for subscription in list(replaying):
                subscription.offer(messages)
        buffer = self.pending.get(channel)
        top = buffer[-1].seq if buffer else None
        for message in messages:
            seq = message.seq
            if top is not None and seq <= top:
                continue  # heard twice
            if buffer and top is not None and seq != top + 1:
                # A gap in what was heard. What is buffered goes to every subscriber now, the
                # slow way, and the buffer starts over: a subscriber then finds itself behind
                # it and reads the store for what was never announced.
                for subscription in self.channels[channel]:
                    if subscription._catching_up is None:
                        subscription.offer(buffer)
                buffer = None
            if buffer is None:
                buffer = self.pending[channel] = []
            buffer.append(message)
            top = seq
        self.schedule_flush()

    def resync(self) -> None:
        """Catch every subscription up from the store (see :meth:`Subscription.resync`)."""
        for subscribers in self.channels.values():
            for subscription in subscribers:
                subscription.resync()

    def schedule_flush(self) -> None:
        if self._flush_scheduled or self._flushing is not None:
            return  # the flush under way schedules the next when it ends
        if self.dirty or self.pending:
            self._flush_scheduled = True
            loop = asyncio.get_running_loop()
            delay = self.coalesce_delay()
            if delay > 0:
                loop.call_later(delay, self._flush)
            else:
                loop.call_soon(self._flush)

    def coalesce_delay(self) -> float:
        """How long the next flush waits for more messages: as long as the last flush took,
        capped, if it ended less than that cap ago; else nothing."""
        cap = self.max_coalesce_delay
        if self._clock() - self._last_flush_end > cap:
            return 0.0
        return min(cap, self._last_flush_cost)

    def _flush(self) -> None:
        """Start a flush: every subscriber of a channel with buffered messages, and every
        subscription with bytes of its own queued, is visited once, a slice at a time."""
        self._flush_scheduled = False
        visits: list[Subscription] = []
        marks: dict[str, int] = {}
        for channel, buffer in self.pending.items():
            subscribers = self.channels.get(channel)
            if subscribers:
                visits.extend(subscribers)
                marks[channel] = buffer[-1].seq
        dirty, self.dirty = self.dirty, set()
        visits.extend(dirty)
        self._grouped = bool(self._shared)
        if self._grouped:
            visits = self._group_by_sink(visits)
        self._flushing = visits
        self._marks = marks
        self._flushed = 0
        self._flush_cost = 0.0
        self._flush_slice()

    def _group_by_sink(self, visits: list[Subscription]) -> list[Subscription]:
        """The same visits with the subscriptions of each multiplexed connection next to each
        other, so that the connection gets one write for all its channels."""
        shared = self._shared
        alone = [subscription for subscription in visits if subscription.sink not in shared]
        together: dict[Sink, list[Subscription]] = {}
        for subscription in visits:
            if subscription.sink in shared:
                together.setdefault(subscription.sink, []).append(subscription)
        for subscriptions in together.values():
            alone.extend(subscriptions)
        return alone

    def _flush_slice(self) -> None:
        """Visit the next :data:`FLUSH_SLICE` subscriptions of the flush under way, then let
        the event loop run (a publish is answered between two slices, not after the whole
        flush) before the next slice."""
        began = self._clock()
        visits = self._flushing
        assert visits is not None
        start = self._flushed
        end = min(start + FLUSH_SLICE, len(visits))
        grouped = self._grouped
        while grouped and end < len(visits) and visits[end].sink is visits[end - 1].sink:
            end += 1  # a connection's subscriptions stay in one slice: one write for them all
        pending = self.pending
        limit = self.max_outbound_bytes
        for index in range(start, end):
            subscription = visits[index]
            sink = subscription.sink
            if sink.closed:
                continue
            try:
                if subscription._catching_up is None and not subscription._gone:
                    buffer = pending.get(subscription.channel)
                    if buffer:
                        last = subscription.last_seq
                        top = buffer[-1].seq
                        if last is None or last < top:
                            first = buffer[0].seq
                            if last is None or last >= first - 1:
                                encode = subscription.encode
                                if last == top - 1:
                                    sink.write(encode(buffer[-1]))
                                else:
                                    since = 0 if last is None else last + 1 - first
                                    for message in buffer[since:]:
                                        sink.write(encode(message))
                                subscription.last_seq = top
                            else:
                                # Behind what the buffer still holds: read the store.
                                subscription.offer(buffer)
                if grouped and index + 1 < end and visits[index + 1].sink is sink:
                    continue  # the connection's next subscription writes for both
                sink.flush()
                if sink.buffered() > limit:
                    sink.close(CloseReason.SLOW_CONSUMER)
            except Exception:
                log.exception("writing to a subscriber failed; closing it")
                sink.close(CloseReason.FAILED)
        now = self._clock()
        self._flush_cost += now - began
        if end < len(visits):
            self._flushed = end
            asyncio.get_running_loop().call_soon(self._flush_slice)
            return
        self._flushing = None
        # Every subscriber visited has what was buffered when the flush began: drop that.
        # Whatever came in since is still owed to those visited before it came.
        for channel, mark in self._marks.items():
            buffer = pending.get(channel)
            if buffer is None:
                continue
            keep = buffer[-1].seq - mark
            if keep <= 0:
                del pending[channel]
            elif keep < len(buffer):
                del buffer[: len(buffer) - keep]
        self._marks = {}
        self._last_flush_end = now
        self._last_flush_cost = self._flush_cost
        self.schedule_flush()  # for what was heard while this one went out

    def attach(self, sink: Sink) -> None:
        """Track a connection that may have no subscription yet, so :meth:`close_all` reaches
        it too."""
        self.attached.add(sink)

    def detach(self, sink: Sink) -> None:
        self.attached.discard(sink)

    def close_all(self, reason: CloseReason) -> None:
        for sink in list(self.attached):
            sink.close(reason)
        for subscribers in list(self.channels.values()):
            for subscription in list(subscribers):
                subscription.sink.close(reason)

    def busy(self) -> bool:
        """Are any connections still attached or subscribed?"""
        return bool(self.attached or self.channels)

    def count(self, channel: str) -> dict[str, int]:
        """Open subscriptions of ``channel`` by transport. A connection that was cut (a slow
        consumer given time to read its goodbye) gets nothing more and is not counted."""
        counts: dict[str, int] = {}
        for subscription in self.channels.get(channel, ()):
            if subscription.sink.closed:
                continue
            counts[subscription.transport] = counts.get(subscription.transport, 0) + 1
        return counts
