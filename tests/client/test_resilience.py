"""Retries, backoff and the circuit breaker, with a controllable clock and no sleeping."""

from __future__ import annotations

import httpx
import pytest

from backchannel.client import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Client,
    HubError,
    HubUnreachable,
    Resilience,
    RetryPolicy,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=10, base=0.1, cap=1.0)
    error = HubUnreachable("down")
    assert [policy.delay(n, error, lambda: 1.0) for n in range(1, 7)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]
    assert policy.delay(3, error, lambda: 0.5) == pytest.approx(0.2)
    assert policy.delay(3, error, lambda: 0.0) == 0.0


def test_retry_after_is_honoured_within_the_cap() -> None:
    policy = RetryPolicy(base=0.1, cap=3.0)
    busy = HubError(503, {"title": "Too busy"}, {"retry-after": "2"})
    assert policy.delay(1, busy, lambda: 0.0) == 2.0
    flood = HubError(503, {"title": "Too busy"}, {"retry-after": "60"})
    assert policy.delay(1, flood, lambda: 0.0) == 3.0


def test_only_hub_failures_of_safe_calls_are_retried() -> None:
    resilience = Resilience(retry=RetryPolicy(attempts=3), rand=lambda: 1.0)
    down = HubUnreachable("down")
    assert resilience.next_delay(1, down, safe=True) is not None
    assert resilience.next_delay(3, down, safe=True) is None  # attempts used up
    assert resilience.next_delay(1, down, safe=False) is None
    refused = HubError(400, {"title": "Invalid channel name"})
    assert resilience.next_delay(1, refused, safe=True) is None
    assert resilience.next_delay(1, HubError(503, {}), safe=True) is not None


def test_breaker_opens_after_threshold_probes_once_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, reset_after=10, clock=clock)
    for _ in range(3):
        breaker.before_call()
        breaker.failed(HubUnreachable("down"))
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.retry_in == 10
    clock.now = 10
    breaker.before_call()  # the probe goes through
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # one probe at a time
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()


def test_a_failed_probe_opens_the_breaker_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, reset_after=5, clock=clock)
    breaker.failed(HubUnreachable("down"))
    clock.now = 5
    breaker.before_call()
    breaker.failed(HubUnreachable("still down"))
    assert breaker.state is BreakerState.OPEN
    clock.now = 9
    with pytest.raises(CircuitOpen):
        breaker.before_call()


def test_refusals_do_not_count_as_failures() -> None:
    breaker = CircuitBreaker(threshold=1)
    breaker.failed(HubError(400, {}))
    assert breaker.state is BreakerState.CLOSED


def test_client_retries_with_backoff_then_trips_the_breaker() -> None:
    """The client over a transport that always fails, with sleeps recorded, not slept."""
    slept: list[float] = []
    clock = Clock()

    def failing(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = Client(
        "http://hub.test",
        sleep=slept.append,
        retry=RetryPolicy(attempts=3, base=0.1, cap=1.0),
        breaker=CircuitBreaker(threshold=5, reset_after=30, clock=clock),
    )
    client.resilience.rand = lambda: 1.0
    client._http = httpx.Client(base_url="http://hub.test", transport=httpx.MockTransport(failing))
    with pytest.raises(HubUnreachable):
        client.info("c")
    assert slept == [0.1, 0.2]  # three attempts, two waits
    with pytest.raises(HubUnreachable):  # two more failures make five: the breaker opens
        client.info("c")
    assert slept == [0.1, 0.2, 0.1]
    with pytest.raises(CircuitOpen):
        client.info("c")
    assert slept == [0.1, 0.2, 0.1]  # fails fast: no attempt, no wait
    clock.now = 30
    with pytest.raises(HubUnreachable):  # the probe is let through, and fails
        client.info("c")
    assert client.resilience.breaker is not None
    assert client.resilience.breaker.state is BreakerState.OPEN


def test_publish_carries_an_idempotency_key_and_retries_with_the_same_one() -> None:
    keys: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        if len(keys) == 1:
            return httpx.Response(503, json={"title": "Unavailable"}, headers={"retry-after": "0"})
        return httpx.Response(201, json={"id": "0000000000000001", "channel": "c", "time": "t"})

    client = Client("http://hub.test", sleep=lambda s: None)
    client._http = httpx.Client(base_url="http://hub.test", transport=httpx.MockTransport(flaky))
    published = client.publish("c", {"n": 1})
    assert published.id == "0000000000000001"
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 32
