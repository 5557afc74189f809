"""Retries with backoff and a circuit breaker: pure logic over an injected clock.

Both are shared by :class:`~backchannel.client.Client` and
:class:`~backchannel.client.AsyncClient`; neither sleeps nor does I/O, so they are tested with
a fake clock and a fixed random source.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CircuitOpen, ClientError, HubError, HubUnreachable

RETRYABLE_STATUSES = frozenset({502, 503, 504})


def is_retryable(error: BaseException) -> bool:
    """Is it worth trying a safe call again after ``error``?"""
    if isinstance(error, HubUnreachable):
        return True
    return isinstance(error, HubError) and error.status in RETRYABLE_STATUSES


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt ``n`` (from 1) waits a random time between
    0 and ``min(cap, base * 2 ** (n - 1))``, or the hub's ``Retry-After`` if it asked for
    longer."""

    attempts: int = 4  # in all, the first one included
    base: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int, error: BaseException, rand: Callable[[], float]) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** (attempt - 1))
        wait = ceiling * float(rand())
        if isinstance(error, HubError):
            retry_after = error.headers.get("retry-after")
            if retry_after is not None and retry_after.isdigit():
                wait = max(wait, min(float(retry_after), self.cap))
        return wait


NO_RETRIES = RetryPolicy(attempts=1)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` failures in a row; while open, calls fail at once with
    :class:`CircuitOpen`. After ``reset_after`` seconds one call is let through as a probe
    (half-open): its success closes the breaker, its failure opens it again."""

    threshold: int = 5
    reset_after: float = 10.0
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = field(default=float("-inf"))
    _probing: bool = False

    def before_call(self) -> None:
        """Raise :class:`CircuitOpen` unless a call may go ahead now."""
        if self.state is BreakerState.CLOSED:
            return
        now = self.clock()
        if self.state is BreakerState.OPEN:
            remaining = self.opened_at + self.reset_after - now
            if remaining > 0:
                raise CircuitOpen(remaining)
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self._probing:  # half-open: one probe at a time
            raise CircuitOpen(0.0)
        self._probing = True

    def succeeded(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._probing = False

    def failed(self, error: BaseException) -> None:
        """Record a call that failed. Only failures of the hub count (it is unreachable or
        overloaded), not a refusal of bad input."""
        if not is_retryable(error):
            if self.state is BreakerState.HALF_OPEN:
                self.succeeded()  # the hub answered: it is up
            return
        self._probing = False
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state = BreakerState.OPEN
            self.opened_at = self.clock()


@dataclass
class Resilience:
    """What one client uses to decide retries: the policy, the breaker, and the random source
    for jitter (injectable for tests)."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: CircuitBreaker | None = field(default_factory=CircuitBreaker)
    rand: Callable[[], float] = random.random

    def next_delay(self, attempt: int, error: ClientError, *, safe: bool) -> float | None:
        """The wait before trying again after ``attempt`` failed with ``error``, or None to
        give up."""
        if not safe or not is_retryable(error) or attempt >= self.retry.attempts:
            return None
        return self.retry.delay(attempt, error, self.rand)
