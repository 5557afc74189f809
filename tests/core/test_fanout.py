"""The fan-out engine with in-memory sinks and a scripted store."""

from __future__ import annotations

import asyncio

import pytest

from backchannel.core import fanout
from backchannel.core.fanout import MAX_SET_ASIDE, CloseReason, FanOut
from backchannel.core.messages import Message


def msg(seq: int, channel: str = "c") -> Message:
    return Message(
        channel=channel, seq=seq, time_ms=seq, content_type="text/plain", data=f"m{seq}".encode()
    )


class Sink:
    def __init__(self) -> None:
        self.queued: list[bytes] = []
        self.sent: list[bytes] = []
        self.stuck = 0  # bytes a peer has not read
        self.writes: list[list[bytes]] = []  # what each flush that wrote something wrote
        self.close_reason: CloseReason | None = None

    def write(self, data: bytes) -> None:
        self.queued.append(data)

    def flush(self) -> None:
        if self.queued:
            self.writes.append(list(self.queued))
        self.sent += self.queued
        self.queued = []

    def buffered(self) -> int:
        return self.stuck + sum(map(len, self.queued))

    async def drained(self) -> None:
        return None

    def close(self, reason: CloseReason) -> None:
        self.close_reason = self.close_reason or reason

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def seqs(self) -> list[int]:
        return self.seqs_of(self.sent + self.queued)

    @staticmethod
    def seqs_of(frames: list[bytes]) -> list[int]:
        return [int(frame.split(b":")[0]) for frame in frames]


def frame(message: Message) -> bytes:
    return f"{message.seq}:".encode() + message.data


class Store:
    """History from 1 to ``last``; reads can be held to let live messages race them."""

    def __init__(self, last: int = 0) -> None:
        self.last = last
        self.reads: list[tuple[int, int]] = []
        self.gate: asyncio.Event | None = None

    async def read(self, channel: str, after: int, limit: int) -> list[Message]:
        self.reads.append((after, limit))
        if self.gate is not None:
            await self.gate.wait()
        return [msg(s, channel) for s in range(after + 1, min(self.last, after + limit) + 1)]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def replay_held(last: int) -> tuple[Store, FanOut, Sink]:
    """A sink subscribed from the start of a channel whose history (1 to ``last``) is being
    read: the read waits on ``store.gate``."""
    store = Store(last=last)
    store.gate = asyncio.Event()
    engine = FanOut(store.read)
    sink = Sink()
    engine.subscribe("c", sink, frame, transport="t", after=0)
    await settle()
    return store, engine, sink


async def test_live_delivery_in_order_and_coalesced() -> None:
    engine = FanOut(Store().read)
    sink = Sink()
    engine.subscribe("c", sink, frame, transport="t", after=None)
    engine.deliver("c", [msg(1), msg(2)])
    engine.deliver("c", [msg(3)])
    assert sink.sent == []  # nothing is written per message: one flush per loop turn
    await settle()
    assert sink.seqs() == [1, 2, 3]


async def test_each_message_is_encoded_once_for_all_subscribers() -> None:
    engine = FanOut(Store().read)
    sinks = [Sink() for _ in range(100)]
    for sink in sinks:
        engine.subscribe("c", sink, lambda m: m.sse, transport="sse", after=None)
    engine.deliver("c", [msg(1)])
    await settle()
    first = sinks[0].sent[0]
    assert all(sink.sent == [first] and sink.sent[0] is first for sink in sinks)


async def test_duplicates_are_skipped() -> None:
    engine = FanOut(Store().read)
    sink = Sink()
    engine.subscribe("c", sink, frame, transport="t", after=None)
    engine.deliver("c", [msg(1), msg(2)])
    engine.deliver("c", [msg(2), msg(3)])
    await settle()
    assert sink.seqs() == [1, 2, 3]


async def test_a_gap_is_filled_from_the_store() -> None:
    store = Store(last=5)
    engine = FanOut(store.read)
    sink = Sink()
    engine.subscribe("c", sink, frame, transport="t", after=None)
    engine.deliver("c", [msg(1)])
    engine.deliver("c", [msg(4), msg(5)])  # 2 and 3 never announced
    await settle()
    assert sink.seqs() == [1, 2, 3, 4, 5]
    assert store.reads[0][0] == 1


async def test_replay_then_live_join_at_the_seam() -> None:
    store, engine, sink = await replay_held(last=3)
    # Published while the replay read is in flight; 3 is both in the read and announced.
    engine.deliver("c", [msg(3), msg(4)])
    engine.deliver("c", [msg(5)])
    store.gate.set()
    await settle()
    assert sink.seqs() == [1, 2, 3, 4, 5]


async def test_replay_reads_again_when_live_messages_are_beyond_its_snapshot() -> None:
    store, engine, sink = await replay_held(last=2)
    engine.deliver("c", [msg(4)])  # 3 was committed after the snapshot but not announced yet
    store.last = 4
    store.gate.set()
    await settle()
    assert sink.seqs()[:2] == [1, 2]
    # The first read stopped at its snapshot (2); the set-aside 4 left a gap: read again.
    assert sink.seqs() == [1, 2, 3, 4]


async def test_set_aside_overflow_falls_back_to_the_store() -> None:
    store, engine, sink = await replay_held(last=1)
    flood = [msg(s) for s in range(2, MAX_SET_ASIDE + 10)]
    engine.deliver("c", flood)
    store.last = flood[-1].seq
    store.gate.set()
    await settle()
    for _ in range(100):
        if len(sink.seqs()) == store.last:
            break
        await asyncio.sleep(0)
    assert sink.seqs() == list(range(1, store.last + 1))


async def test_slow_consumer_is_closed_others_are_not() -> None:
    engine = FanOut(Store().read, max_outbound_bytes=100)
    slow, fast = Sink(), Sink()
    engine.subscribe("c", slow, frame, transport="t", after=None)
    engine.subscribe("c", fast, frame, transport="t", after=None)
    slow.stuck = 1000
    engine.deliver("c", [msg(1)])
    await settle()
    assert slow.close_reason is CloseReason.SLOW_CONSUMER
    assert fast.close_reason is None and fast.seqs() == [1]


async def test_close_all_reaches_attached_and_subscribed_sinks() -> None:
    engine = FanOut(Store().read)
    idle, subscribed = Sink(), Sink()
    engine.attach(idle)
    engine.subscribe("c", subscribed, frame, transport="t", after=None)
    assert engine.busy()
    engine.close_all(CloseReason.SHUTTING_DOWN)
    assert idle.close_reason is subscribed.close_reason is CloseReason.SHUTTING_DOWN


async def test_unsubscribe_stops_delivery_and_counts() -> None:
    engine = FanOut(Store().read)
    sink = Sink()
    subscription = engine.subscribe("c", sink, frame, transport="sse", after=None)
    assert engine.count("c") == {"sse": 1}
    engine.unsubscribe(subscription)
    engine.deliver("c", [msg(1)])
    await settle()
    assert sink.sent == [] and engine.count("c") == {} and not engine.busy()


@pytest.mark.parametrize("after", [0, 2])
async def test_replay_starts_after_the_cursor(after: int) -> None:
    engine = FanOut(Store(last=4).read)
    sink = Sink()
    engine.subscribe("c", sink, frame, transport="t", after=after)
    await settle()
    assert sink.seqs() == list(range(after + 1, 5))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_coalescing_waits_only_while_busy_and_never_past_the_cap() -> None:
    clock = Clock()
    engine = FanOut(Store().read, max_coalesce_delay=0.005, clock=clock)
    assert engine.coalesce_delay() == 0  # idle: a lone message goes at once

    class SlowSink(Sink):
        def flush(self) -> None:
            clock.now += 0.002  # this flush "takes" 2 ms
            super().flush()

    engine.subscribe("c", SlowSink(), frame, transport="t", after=None)
    engine.deliver("c", [msg(1)])
    await settle()
    assert engine.coalesce_delay() == pytest.approx(0.002)  # busy: wait as long as it took
    clock.now += 0.001
    assert engine.coalesce_delay() == pytest.approx(0.002)
    engine._last_flush_cost = 0.5
    assert engine.coalesce_delay() == 0.005  # never more than the cap
    clock.now += 0.01
    assert engine.coalesce_delay() == 0  # quiet again for longer than the cap


async def test_no_coalescing_when_disabled() -> None:
    engine = FanOut(Store().read, max_coalesce_delay=0)
    engine._last_flush_cost = 1.0
    engine._last_flush_end = engine._clock()
    assert engine.coalesce_delay() == 0


async def test_resync_reads_what_was_never_announced() -> None:
    store = Store(last=2)
    engine = FanOut(store.read)
    sink, fresh = Sink(), Sink()
    engine.subscribe("c", sink, frame, transport="t", after=None)
    engine.deliver("c", [msg(1)])
    await settle()
    engine.subscribe("c", fresh, frame, transport="t", after=None)  # from now: no cursor yet
    # 2 and 3 were appended while the store's link was down: nobody announces them.
    store.last = 3
    engine.resync()
    await settle()
    assert sink.seqs() == [1, 2, 3]
    assert store.reads == [(1, 500)]  # the one without a cursor does not read
    assert fresh.seqs() == []
    engine.deliver("c", [msg(4)])
    await settle()
    assert sink.seqs() == [1, 2, 3, 4]
    assert fresh.seqs() == [4]


async def test_resync_during_a_replay_makes_it_read_once_more() -> None:
    store, engine, sink = await replay_held(last=2)
    store.last = 3  # appended after the replay's read began; its notification was lost
    engine.resync()
    store.gate.set()
    await settle()
    assert sink.seqs() == [1, 2, 3]
    assert len(store.reads) == 2


def subscribed(engine: FanOut, count: int) -> list[Sink]:
    """``count`` sinks subscribed to channel c from now."""
    sinks = [Sink() for _ in range(count)]
    for sink in sinks:
        engine.subscribe("c", sink, frame, transport="t", after=None)
    return sinks


async def test_a_publish_touches_no_subscriber_until_the_flush() -> None:
    engine = FanOut(Store().read)
    sinks = subscribed(engine, 3)
    engine.deliver("c", [msg(1)])
    assert all(sink.queued == [] for sink in sinks)
    assert engine.pending == {"c": [msg(1)]}
    await settle()
    assert all(sink.seqs() == [1] for sink in sinks)
    assert engine.pending == {}  # everyone has it: the buffer is let go


async def test_a_flush_lets_the_loop_run_between_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "FLUSH_SLICE", 2)
    engine = FanOut(Store().read)
    sinks = subscribed(engine, 5)
    engine.deliver("c", [msg(1)])
    await asyncio.sleep(0)  # the flush starts and writes its first slice only
    assert sum(bool(sink.sent) for sink in sinks) == 2
    await settle()
    assert all(sink.seqs() == [1] for sink in sinks)


async def test_a_message_heard_mid_flush_rides_along_to_those_not_reached_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "FLUSH_SLICE", 1)
    engine = FanOut(Store().read)
    sinks = subscribed(engine, 4)
    engine.deliver("c", [msg(1)])
    await asyncio.sleep(0)  # one sink has 1
    engine.deliver("c", [msg(2)])
    await asyncio.sleep(engine.max_coalesce_delay * 2)  # the next flush may wait a little
    assert all(sink.seqs() == [1, 2] for sink in sinks)
    writes = sorted([Sink.seqs_of(write) for write in sink.writes] for sink in sinks)
    # The one reached before 2 came gets it in a second flush; the others get both at once.
    assert writes == [[[1], [2]], [[1, 2]], [[1, 2]], [[1, 2]]]
    assert engine.pending == {}


async def test_subscribing_from_now_skips_what_was_heard_before() -> None:
    engine = FanOut(Store().read)
    early, late = Sink(), Sink()
    engine.subscribe("c", early, frame, transport="t", after=None)
    engine.deliver("c", [msg(1)])  # published, not yet flushed
    subscription = engine.subscribe("c", late, frame, transport="t", after=None)
    assert subscription.last_seq == 1
    engine.deliver("c", [msg(2)])
    await settle()
    assert early.seqs() == [1, 2] and late.seqs() == [2]


async def test_unsubscribed_during_a_flush_gets_nothing_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "FLUSH_SLICE", 1)
    engine = FanOut(Store().read)
    sinks = [Sink() for _ in range(3)]
    subscriptions = [
        engine.subscribe("c", sink, frame, transport="t", after=None) for sink in sinks
    ]
    engine.deliver("c", [msg(1)])
    await asyncio.sleep(0)
    unreached = [s for s in subscriptions if not s.sink.sent]  # type: ignore[attr-defined]
    engine.unsubscribe(unreached[0])
    await settle()
    assert unreached[0].sink.sent == []  # type: ignore[attr-defined]
    assert sum(sink.seqs() == [1] for sink in sinks) == 2


async def test_a_sink_that_fails_is_closed_and_the_others_still_get_theirs() -> None:
    engine = FanOut(Store().read)

    class Broken(Sink):
        def flush(self) -> None:
            raise OSError("gone")

    broken, fine = Broken(), Sink()
    engine.subscribe("c", broken, frame, transport="t", after=None)
    engine.subscribe("c", fine, frame, transport="t", after=None)
    engine.deliver("c", [msg(1)])
    await settle()
    assert broken.close_reason is CloseReason.FAILED
    assert fine.seqs() == [1]
    engine.deliver("c", [msg(2)])  # and flushing goes on (after a coalescing delay)
    await asyncio.sleep(engine.max_coalesce_delay * 2)
    assert fine.seqs() == [1, 2]


async def test_a_subscriber_behind_the_buffer_reads_the_store() -> None:
    store = Store(last=3)
    engine = FanOut(store.read)
    sink = Sink()
    subscription = engine.subscribe("c", sink, frame, transport="t", after=None)
    engine.deliver("c", [msg(1)])
    await settle()
    subscription.last_seq = 0  # as if 1 had been dropped from the buffer before it got it
    sink.sent = []
    engine.deliver("c", [msg(2), msg(3)])
    await settle()
    assert sink.seqs() == [1, 2, 3]
    assert store.reads == [(0, fanout.REPLAY_BATCH)]


async def test_a_connection_with_several_subscriptions_gets_one_write_per_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "FLUSH_SLICE", 2)  # smaller than its group of 3
    engine = FanOut(Store().read)
    mux = Sink()
    others = [Sink() for _ in range(3)]
    for channel in ("a", "b", "c"):
        engine.subscribe(channel, mux, frame, transport="ws", after=None)
    for sink, channel in zip(others, ("a", "b", "c"), strict=True):
        engine.subscribe(channel, sink, frame, transport="sse", after=None)
    engine.deliver("a", [msg(1, "a")])
    engine.deliver("b", [msg(1, "b")])
    engine.deliver("c", [msg(1, "c")])
    await settle()
    assert len(mux.writes) == 1 and len(mux.writes[0]) == 3
    assert all(sink.seqs() == [1] for sink in others)
    # Unsubscribed from all but one: no longer grouped, still delivered.
    subscriptions = [s for subs in engine.channels.values() for s in subs if s.sink is mux]
    for subscription in subscriptions[1:]:
        engine.unsubscribe(subscription)
    assert not engine._shared
    kept = subscriptions[0].channel
    engine.deliver(kept, [msg(2, kept)])
    await asyncio.sleep(engine.max_coalesce_delay * 2)
    assert len(mux.writes) == 2 and Sink.seqs_of(mux.writes[1]) == [2]
