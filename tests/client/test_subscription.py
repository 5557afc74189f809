"""The I/O-free parts of subscriptions: close codes, keepalive, resume rules."""

from __future__ import annotations

import pytest

from backchannel.client import (
    CircuitBreaker,
    CircuitOpen,
    Client,
    HubError,
    HubUnreachable,
    Resilience,
    RetryPolicy,
)
from backchannel.client.models import Message
from backchannel.client.subscription import Keepalive, Resume, Spec, close_error, next_event
from backchannel.wire import frames as f


def message(seq: int) -> Message:
    return Message(
        id=f"{seq:016x}",
        channel="c",
        time="t",
        content_type="text/plain",
        encoding="text",
        data="x",
    )


def test_refusal_closes_carry_their_problem_type() -> None:
    error = close_error(4000, "invalid-channel: 'a b' is not a channel name")
    assert isinstance(error, HubError)
    assert (error.status, error.slug) == (400, "invalid-channel")
    assert isinstance(close_error(1008, ""), HubError)
    for code in (1001, 1006, 1011, 1012, 4008):
        assert isinstance(close_error(code, "bye"), HubUnreachable)


def test_keepalive_pings_once_then_declares_the_connection_dead() -> None:
    keepalive = Keepalive()
    first = keepalive.ping()
    keepalive.heard()
    second = keepalive.ping()
    assert second.request == first.request + 1
    with pytest.raises(HubUnreachable):
        keepalive.ping()  # the second ping was never answered


def test_resume_skips_what_it_has_seen_and_gives_up_only_on_refusals() -> None:
    resume = Resume(Resilience(retry=RetryPolicy(base=0.1, cap=1.0), rand=lambda: 1.0), None)
    resume.start("0000000000000002")
    assert not resume.accept(message(2))
    assert resume.accept(message(3)) and resume.after() == 3
    assert not resume.accept(message(3))
    assert resume.duplicates == 2
    assert resume.failed(HubUnreachable("down")) == 0.1
    assert resume.failed(HubUnreachable("down")) == 0.2
    assert resume.accept(message(4)) and resume.failures == 0
    with pytest.raises(HubError):
        resume.failed(HubError(400, {"title": "bad"}))
    assert resume.failed(CircuitOpen(3.0)) == 3.0  # waits for the breaker's probe


def test_reconnect_limit_counts_failures_in_a_row() -> None:
    resume = Resume(Resilience(rand=lambda: 0.0), reconnect_limit=2)
    resume.start("0")
    resume.failed(HubUnreachable("1"))
    resume.failed(HubUnreachable("2"))
    with pytest.raises(HubUnreachable):
        resume.failed(HubUnreachable("3"))


def test_spec_refuses_bad_via_and_cursor_before_sending() -> None:
    with pytest.raises(ValueError):
        Spec("c", "carrier-pigeon", None, 30, 1)
    with pytest.raises(ValueError):
        Spec("c", "sse", "yesterday", 30, 1)


def test_retry_and_breaker_options_do_not_change_a_shared_resilience() -> None:
    shared = Resilience()
    first = Client("http://hub.test", resilience=shared)
    second = Client(
        "http://hub.test",
        resilience=shared,
        retry=RetryPolicy(attempts=1),
        breaker=CircuitBreaker(threshold=1),
    )
    assert first.resilience.retry == RetryPolicy() == shared.retry
    assert second.resilience.retry.attempts == 1
    assert shared.breaker is not second.resilience.breaker


def _welcomed_client() -> f.Connection:
    client = f.Connection(f.Role.CLIENT)
    server = f.Connection(f.Role.SERVER)
    server.receive_data(client.send(f.Hello(versions=(1,))))
    assert isinstance(server.next_event(), f.Hello)
    client.receive_data(server.send(f.Welcome(version=1, max_frame=1 << 20, server="t")))
    assert isinstance(next_event(client), f.Welcome)
    return client


def test_a_tcp_connection_cut_mid_frame_is_unreachable_not_a_violation() -> None:
    # How a killed hub, or one that cut a slow consumer, leaves a connection: retried.
    client = _welcomed_client()
    client.receive_data(b"\x00\x00\x01\x00\x05partial")
    assert next_event(client) is f.NEED_DATA
    client.receive_data(b"")
    with pytest.raises(HubUnreachable, match="middle of a frame"):
        next_event(client)


def test_a_malformed_frame_from_an_open_connection_is_still_a_violation() -> None:
    client = _welcomed_client()
    client.receive_data(b"\x00\x00\x00\x01\xee")  # an unknown frame type
    with pytest.raises(f.RemoteProtocolError):
        next_event(client)
