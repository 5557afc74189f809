"""Exceptions raised by the client SDK.

::

    ClientError
    ├── HubUnreachable       no connection could be made, or it broke before an answer
    │   └── HubTimeout       a connect, read, write or pool wait took longer than its timeout
    ├── ProtocolViolation    the hub answered with something this client cannot read
    ├── HubError             the hub answered with an error; .problem is its RFC 9457 document
    │   ├── Unauthorized     401: no token, or one the hub does not accept (or expired)
    │   └── Forbidden        403: the token does not grant this channel, queue or route
    └── CircuitOpen          the circuit breaker is open: the call was not attempted

Only :class:`HubUnreachable` (and :class:`HubTimeout`) and :class:`HubError` with a status of
502, 503 or 504 are retried, and only for calls that are safe to repeat.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ClientError(Exception):
    pass


class HubUnreachable(ClientError):
    pass


class HubTimeout(HubUnreachable):
    pass


class ProtocolViolation(ClientError):
    pass


class HubError(ClientError):
    def __init__(
        self, status: int, problem: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        self.status = status
        self.problem = problem
        self.headers: Mapping[str, str] = headers or {}  # case-insensitive, e.g. Retry-After
        title = problem.get("title") or f"HTTP {status}"
        detail = problem.get("detail")
        super().__init__(f"{title}: {detail}" if detail else title)

    @property
    def type(self) -> str:
        return str(self.problem.get("type", "about:blank"))

    @property
    def slug(self) -> str:
        """The problem type's last segment, e.g. ``invalid-channel``."""
        return self.type.rsplit("/", 1)[-1]


class Unauthorized(HubError):
    """401: the hub wants a token (``token-required``), or refused the one sent
    (``invalid-token``, ``token-expired``; see :attr:`HubError.slug`)."""


class Forbidden(HubError):
    """403: the token is valid but does not grant this (``forbidden``), or a browser origin
    is not allowed (``origin-not-allowed``)."""


def hub_error(
    status: int, problem: dict[str, Any], headers: Mapping[str, str] | None = None
) -> HubError:
    """The :class:`HubError` for ``status``: :class:`Unauthorized` for 401, :class:`Forbidden`
    for 403."""
    kind = {401: Unauthorized, 403: Forbidden}.get(status, HubError)
    return kind(status, problem, headers)


class CircuitOpen(ClientError):
    def __init__(self, retry_in: float) -> None:
        self.retry_in = retry_in
        super().__init__(f"the circuit breaker is open; the next probe in {retry_in:.1f} s")
