"""Connection limits of the process: the file limit, and how many connections the hub keeps open.

Every open connection (HTTP, an SSE stream, a WebSocket, a TCP client) holds one file
descriptor. When the process runs out of them, ``accept()`` fails with ``EMFILE`` and the
event loop stops accepting for a second at a time, while the store may fail to open a file.
So the hub counts its connections against ``max_connections``, a little below the file limit,
and refuses the ones past it with an answer the client understands (a ``503`` problem with
``Retry-After``, or an ERROR frame on TCP) while it still has descriptors to answer with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sized

log = logging.getLogger("backchannel")

#: File descriptors kept free of connections: the store's files, the listening sockets, the
#: event loop's own, log files, and the connections being refused.
HEADROOM = 128
#: The fewest connections a derived ``max_connections`` allows, whatever the file limit.
MIN_CONNECTIONS = 16
#: How long a refused connection stays open after its answer, reading and dropping what the
#: client sends, so that closing does not reset the connection before the answer is read.
REFUSED_LINGER = 1.0

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit (as Go programs and many servers
    do at start-up) and return the soft limit in force, or 0 where there is none to read."""
    if resource is None:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
    if soft == resource.RLIM_INFINITY:
        return 0
    return int(soft)


def derived_max_connections(file_limit: int) -> int:
    """``max_connections`` when the setting is 0: the file limit less :data:`HEADROOM`."""
    if file_limit <= 0:
        return 1 << 20
    return max(MIN_CONNECTIONS, file_limit - HEADROOM)


class ConnectionLimit:
    """Counts the open connections of every transport against one limit.

    Each transport registers the collection that holds its open connections (uvicorn's set of
    HTTP and WebSocket protocols, the TCP server's set); a new connection asks :meth:`full`
    once it is in its own collection (or with ``pending=1`` before).

    A refused connection is answered at once and closed a moment later (see
    :data:`REFUSED_LINGER`), which takes a descriptor from the headroom meanwhile; at most
    :attr:`max_lingering` do at once, and past that a refused connection is reset without
    an answer, so that a flood of connections cannot take the descriptors the store needs.
    """

    def __init__(self, limit: int, *, max_lingering: int = HEADROOM // 2) -> None:
        self.limit = limit
        self.max_lingering = max_lingering
        self._sources: list[Sized] = []
        self.refused = 0
        self.lingering = 0

    def track(self, connections: Sized) -> None:
        self._sources.append(connections)

    def open(self) -> int:
        return sum(len(source) for source in self._sources)

    def full(self, pending: int = 0) -> bool:
        """True, and counted as a refusal, when more than ``limit`` connections are open
        (with ``pending`` more that are not in their collection yet)."""
        if self.open() + pending <= self.limit:
            return False
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning(
                "refusing connections: %d open, max_connections is %d (%d refused so far)",
                self.open() + pending,
                self.limit,
                self.refused,
            )
        return True

    def linger(self) -> bool:
        """May one more refused connection stay open for its answer to be read?"""
        if self.lingering >= self.max_lingering:
            return False
        self.lingering += 1
        return True

    def lingered(self) -> None:
        self.lingering -= 1


class Refusal:
    """One refused connection: its answer goes out at once, then the connection lingers for
    :data:`REFUSED_LINGER` seconds (half-closed, dropping what it reads) and is closed. Past
    :attr:`ConnectionLimit.max_lingering` it is reset instead. Call :meth:`done` from the
    protocol's ``connection_lost``."""

    def __init__(self, limit: ConnectionLimit, transport: asyncio.Transport, answer: bytes):
        self._limit = limit
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = limit.linger()
        if not self._lingering:
            transport.abort()
            return
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.close)

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lingering:
            self._lingering = False
            self._limit.lingered()
