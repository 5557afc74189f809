"""What subscriptions share, sync or async: the cursor they resume from and when to retry.

A subscription yields each message once, in order: :meth:`Resume.accept` drops anything at or
before the cursor (a transport may repeat a message across a reconnection), and every
reconnection asks for what comes after the cursor. Failures that the hub may recover from
(unreachable, overloaded, restarting, slow-consumer cut) are retried with backoff for as long as
it takes, or ``reconnect_limit`` times in a row; a refusal (bad channel name, bad cursor) is
raised to the caller at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..wire import frames as f
from ..wire import parse_id
from ._base import VIAS
from .errors import CircuitOpen, ClientError, HubError, HubUnreachable, hub_error
from .models import Message
from .resilience import Resilience, is_retryable

#: WebSocket close codes that mean "the request was refused", as opposed to "try again".
_REFUSALS = {4000: 400, 1008: 403, 4401: 401, 4403: 403}
#: The SSE event, WebSocket close code and TCP error type of a stream whose token expired.
TOKEN_EXPIRED = "token-expired"
CLOSE_TOKEN_EXPIRED = 4401
_SLUG = re.compile(r"[a-z][a-z-]*")
#: Seconds of silence on a TCP subscription before the client pings the hub; a ping left
#: unanswered for as long again means the connection is dead.
IDLE_PING = 20.0


def close_error(code: int, reason: str) -> ClientError:
    """A WebSocket close as the exception it stands for. The hub's refusals give their
    problem type first in the reason: ``invalid-channel: …``."""
    status = _REFUSALS.get(code)
    if status is None:
        return HubUnreachable(f"the hub closed the WebSocket ({code} {reason})".strip())
    slug, sep, detail = reason.partition(": ")
    problem: dict[str, object] = {"title": f"WebSocket closed with {code}", "detail": reason}
    if sep and _SLUG.fullmatch(slug):
        problem = {"type": f"/problems/{slug}", "title": slug, "detail": detail}
    return hub_error(status, problem)


def refused_handshake(status: int, body: bytes | bytearray, url: str) -> ClientError:
    """A WebSocket handshake the hub answered with an HTTP error instead of 101 (a 401 or 403
    for the token, with a problem document)."""
    try:
        problem: Any = orjson.loads(bytes(body))
    except orjson.JSONDecodeError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": f"HTTP {status}", "detail": f"the hub refused {url}"}
    if status >= 500:
        return HubUnreachable(f"the hub answered the WebSocket handshake with {status}")
    return hub_error(status, problem)


def token_expired(problem: dict[str, Any] | None = None) -> HubError:
    """The error a subscription raises when its stream ended because the token expired (and
    the client cannot get a new one: its token is a string, not a function)."""
    return hub_error(
        401,
        problem
        or {
            "type": f"/problems/{TOKEN_EXPIRED}",
            "title": "Token expired",
            "detail": "the token expired during the subscription",
        },
    )


def next_event(codec: f.Connection) -> f.Event:
    """The TCP codec's next event, where a connection that ends in the middle of a frame is
    :class:`HubUnreachable` (retried), not a protocol violation: that is how a hub that was
    killed, or that cut a slow consumer, leaves the connection."""
    try:
        return codec.next_event()
    except f.RemoteProtocolError as exc:
        if codec.peer_closed:
            raise HubUnreachable(f"the TCP connection broke: {exc}") from exc
        raise


class Keepalive:
    """Pings for a TCP subscription that has heard nothing for :data:`IDLE_PING` seconds."""

    def __init__(self) -> None:
        self._next = 0
        self._waiting = False

    def ping(self) -> f.Ping:
        if self._waiting:
            raise HubUnreachable(f"the hub did not answer a ping within {IDLE_PING:g} s")
        self._waiting = True
        self._next = self._next % 0xFFFFFFFF + 1
        return f.Ping(request=self._next)

    def heard(self) -> None:
        self._waiting = False


@dataclass(frozen=True, slots=True)
class Spec:
    """What a subscription asks for (see ``Client.subscribe``)."""

    channel: str
    via: str
    after: str | None
    wait: float
    interval: float

    def __post_init__(self) -> None:
        if self.via not in VIAS:
            raise ValueError(f"via must be one of {', '.join(VIAS)}")
        if self.after is not None:
            parse_id(self.after)  # a bad cursor is refused before anything is sent


class Resume:
    def __init__(self, resilience: Resilience, reconnect_limit: int | None) -> None:
        self.resilience = resilience
        self.reconnect_limit = reconnect_limit
        self.cursor: int | None = None
        self.failures = 0  # in a row, since the last message
        self.reconnects = 0  # in all
        #: Messages dropped because their id was not above the cursor (repeats).
        self.duplicates = 0
        #: The reconnection delay the hub asked for (SSE ``retry:``), in seconds.
        self.server_retry: float | None = None

    def start(self, cursor: str) -> None:
        """Begin after message ``cursor`` (an id)."""
        self.cursor = parse_id(cursor)

    def after(self) -> int:
        assert self.cursor is not None
        return self.cursor

    def accept(self, message: Message) -> bool:
        """Is ``message`` new? If so it becomes the cursor."""
        assert self.cursor is not None
        if message.seq <= self.cursor:
            self.duplicates += 1
            return False
        self.cursor = message.seq
        self.failures = 0
        return True

    def failed(self, error: ClientError) -> float:
        """The delay before reconnecting after ``error``; raises it when it is final."""
        if isinstance(error, CircuitOpen):
            # The client's breaker is open: wait for its probe, then try (as the probe).
            self.failures += 1
            self.reconnects += 1
            return max(error.retry_in, self.resilience.retry.delay(1, error, self.resilience.rand))
        if not is_retryable(error):
            raise error
        self.failures += 1
        self.reconnects += 1
        if self.reconnect_limit is not None and self.failures > self.reconnect_limit:
            raise error
        return self.resilience.retry.delay(self.failures, error, self.resilience.rand)

    def ended(self) -> float:
        """The delay before reconnecting after the hub ended the stream cleanly (it is shutting
        down, or it cut a slow consumer)."""
        error = HubUnreachable("the hub ended the stream")
        delay = self.failed(error)
        return max(delay, self.server_retry or 0.0)
