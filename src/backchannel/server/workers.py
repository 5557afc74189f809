"""``backchannel serve --workers N``: N hub processes on one machine, sharing its two ports.

The parent binds the HTTP and TCP ports with ``SO_REUSEPORT`` but does not listen on them; each
worker binds the same ports with ``SO_REUSEPORT`` and listens, so the kernel hands every new
connection to one worker's own accept queue, spread by a hash of the connection's addresses.

Why ``SO_REUSEPORT`` rather than one listening socket that the parent binds and every worker
inherits: with a shared socket, every worker wakes for each new connection and asyncio's accept
loop takes as many as are waiting, so a burst of connections (subscribers reconnecting after a
restart) lands mostly on whichever worker woke first, and push connections stay where they
land for hours. With ``SO_REUSEPORT`` the kernel spreads them evenly. The parent's own socket
reserves the port (``--port 0`` is resolved once, for every worker) and takes no connections: a
bound socket that does not listen receives none. The cost: connections still waiting in the
queue of a worker that dies are reset (clients reconnect), and another process of the same user
that binds the same port with ``SO_REUSEPORT`` would share it.

Workers are forked: each builds its own app and its own store connection, and keeps no state
that another worker needs, so the store must be one that processes share (Redis; the settings
refuse SQLite and memory). The parent serves nothing. It prints the start-up line once every
worker is listening, starts a new worker when one dies, and on SIGTERM or SIGINT passes SIGTERM
to every worker, waits for their graceful shutdown, and exits with 0. A worker that fails to
start (the store cannot be reached, say) stops them all, with exit status 3.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from .config import Settings
from .run import (
    GRACEFUL_SHUTDOWN_SECONDS,
    PUSH_GOODBYE_SECONDS,
    banner,
    bind,
    make_app,
    run_server,
)

log = logging.getLogger("backchannel.workers")

#: How long a worker gets to finish after SIGTERM before it is killed.
STOP_SECONDS = GRACEFUL_SHUTDOWN_SECONDS + PUSH_GOODBYE_SECONDS + 10
PR_SET_PDEATHSIG = 1
#: Pause before replacing a worker that died, so that one that dies at once does not spin.
RESTART_DELAY = 0.5


def supervise(settings: Settings) -> None:
    http = bind(settings.host, settings.port, backlog=None, reuse_port=True)
    tcp = (
        bind(settings.host, settings.tcp_port, backlog=None, reuse_port=True)
        if settings.tcp
        else None
    )
    port = http.getsockname()[1]
    tcp_port = tcp.getsockname()[1] if tcp is not None else None
    ready_r, ready_w = os.pipe()
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w, ready_r):
        os.set_blocking(fd, False)
    inherited = [ready_r, wake_r, wake_w]  # pipe ends a worker closes
    context = multiprocessing.get_context("fork")

    def start_worker() -> BaseProcess:
        worker = context.Process(
            target=_worker,
            args=(settings, port, tcp_port, ready_w, inherited, os.getpid()),
            name="backchannel-worker",
        )
        worker.start()
        return worker

    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [start_worker() for _ in range(settings.workers)]
    listening = 0
    announced = False
    status = 0
    try:
        while not stopping:
            by_sentinel = {worker.sentinel: worker for worker in workers}
            woken = wait([ready_r, wake_r, *by_sentinel])
            if wake_r in woken:
                _drain(wake_r)
            if ready_r in woken:
                listening += _drain(ready_r).count(b"\n")
                if not announced and listening >= settings.workers:
                    announced = True
                    shown = banner(settings, port, tcp_port)
                    # Tests and scripts wait for this line; keep its shape.
                    print(
                        f"backchannel listening on {shown} ({settings.workers} workers)",
                        flush=True,
                    )
            for sentinel, worker in by_sentinel.items():
                if sentinel not in woken or stopping:
                    continue
                worker.join()
                workers.remove(worker)
                if not announced:
                    log.error("a worker exited with %s while starting; stopping", worker.exitcode)
                    status = 3
                    stopping.append(0)
                    break
                log.warning(
                    "worker %s exited with %s; starting another", worker.pid, worker.exitcode
                )
                time.sleep(RESTART_DELAY)
                workers.append(start_worker())
    finally:
        signal.set_wakeup_fd(-1)
        _stop(workers)
        http.close()
        if tcp is not None:
            tcp.close()
    if status:
        sys.exit(status)


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _stop(workers: list[BaseProcess]) -> None:
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            log.error("worker %s did not stop in %s s; killing it", worker.pid, STOP_SECONDS)
            worker.kill()
            worker.join()


def _worker(
    settings: Settings,
    port: int,
    tcp_port: int | None,
    ready_fd: int,
    inherited: list[int],
    parent: int,
) -> None:
    """One hub process: its own app, store connection and listening sockets."""
    _stop_with_parent(parent)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fd in inherited:  # the parent's pipe ends (its sockets are left to it: they are objects)
        os.close(fd)
    app = make_app(settings)
    backlog = settings.listen_backlog
    sock = bind(settings.host, port, backlog=backlog, reuse_port=True)
    tcp_socket = (
        bind(settings.host, tcp_port, backlog=backlog, reuse_port=True)
        if tcp_port is not None
        else None
    )

    def ready() -> None:
        os.write(ready_fd, f"{os.getpid()}\n".encode())

    run_server(app, sock, tcp_socket, ready)


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when the parent dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so that no worker outlives its supervisor; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: workers then outlive a killed parent
        return
    if os.getppid() != parent:
        os._exit(0)
