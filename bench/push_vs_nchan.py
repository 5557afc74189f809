"""Push delivery, backchannel against Nchan, side by side in one run.

For every workload the script starts a fresh server, first Nchan (nginx with the nchan module,
``worker_processes 1``), then the backchannel hub (``backchannel serve --store memory://``),
each pinned to CPU 0 with ``taskset -c 0``; this script, the load generator, pins itself (and
the publisher process it starts) to CPU 1. It reports each measure for both servers and their
ratio (backchannel / Nchan).

Workloads (``--workloads``):

``throughput-sse`` / ``throughput-ws``
    S subscribers (``--subscribers``, 1000) on one channel over Server-Sent Events or
    WebSocket. Once the server reports all S subscribed, one publisher sends M messages
    (``--messages``, 1000) of ``--message-bytes`` (100) JSON bytes, as fast as one client can:
    sequential POSTs on one keep-alive HTTP/1.1 connection, each waiting for its answer. The
    clock stops when every subscriber has received all M. Reported: deliveries (S x M) per
    second of server CPU (utime + stime from ``/proc/PID/stat`` of the server processes: the
    hub's one process, nginx's master and its single worker), wall time, publishes per second,
    and the CPU used by the server and by the load generator.
``latency-sse`` / ``latency-ws``
    S subscribers (``--latency-subscribers``, 1000); the publisher sends ``--rate`` (200)
    messages per second for ``--duration`` (10) seconds, each carrying ``time.time_ns()``
    taken just before its request is written. By default (``--publisher open``) each request
    is written at its scheduled time, pipelined on the one connection behind those not
    answered yet, so every server gets the same offered rate and a publish that waits inside
    the server is timed. ``--publisher closed`` is the sequential publisher of the throughput
    runs at a fixed rate: a publish waits for the previous one's answer, so a server that
    answers after its fan-out holds the publisher back (it falls behind its schedule, which
    is reported) and that wait is missing from the latency from the send time. A timed
    subscriber notes ``time.time_ns()`` when the bytes holding a message are handed to it;
    reported are p50 / p99 / max of (receive - send) over the timed subscribers' deliveries,
    and the same from the time the schedule meant each message to be sent.
    By default 100 subscribers (``--latency-probes``), spread evenly over the connection order,
    are timed and read every message as it arrives; the others ask the kernel to wake them
    only once about ``--batch-bytes`` (16 KiB, ``SO_RCVLOWAT``; each subscriber's mark is
    spread between half and one and a half times that, so they do not all wake at once) wait
    in their socket, and read the rest at the end. The server still writes every message to
    every subscriber and every delivery is still checked, but the load generator reads ~10x
    less often: timing all 1000 prompt readers kept CPU 1 near 100% with Nchan and put the
    load generator's own queueing into the numbers. ``--latency-probes 1000 --batch-bytes 0``
    times every delivery.
``memory``
    ``--idle-subscribers`` (10000) idle SSE subscribers; reported is the growth of the server's
    resident memory (``VmRSS`` from ``/proc/PID/status``, summed over the server processes)
    between before the first connection and after the server reports them all subscribed,
    divided by their number. A few warm-up subscribers (``--memory-warmup``) on another channel
    are connected first so that one-time start-up allocations are not counted.

Each table also shows how busy CPUs 0 and 1 were over the run with every process counted
(``/proc/stat``), so that other work on a shared machine shows; ``--quiet-wait`` waits for both
CPUs to be idle before each run.

Every workload checks that nothing was lost: each subscriber must receive every message, in
publish order, with no duplicate (the payload carries a sequence number), and every publish
must be acknowledged (201 for the hub; 201 or 202 for Nchan, which answers 202 when a channel
has no subscriber).

The load generator is asyncio on uvloop with hand-written HTTP/1.1: an SSE subscriber splits
the stream on blank lines and pulls the sequence number and send time out of each event's
data with one regular expression per read (de-chunking first when the server streams with
``Transfer-Encoding: chunked``); a WebSocket subscriber does its own handshake and reads frames
itself. The publisher is a separate process (blocking socket) so that its request loop does not
wait behind the subscribers' reads. Its CPU time and this process's are reported, so a reader
can check that the load generator was not the bottleneck.

The Nchan configuration is written into a temporary folder together with nginx's pid file,
error log and temporary paths; the hub gets its own temporary folder (see ``hubproc.py``).
Every process started here is stopped, and every temporary folder removed, when the script
ends, also on Ctrl-C, SIGTERM or an error.

``--repeat N`` runs every workload N times per server, alternating between the servers, and
the tables show medians. Run ``python bench/push_vs_nchan.py --help`` for the options. The
script exits with status 1 when a check failed on any run.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import gc
import glob
import hashlib
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, cast

from hubproc import (
    BenchError,
    HubProcess,
    handle_stop_signals,
    machine,
    markdown_table,
    percentile,
    process_cpu_seconds,
    require_tool,
    run_main,
    spread_batch,
    stop_process,
)

SERVER_CPU = 0
CLIENT_CPU = 1
CONNECT_CONCURRENCY = 256
CONTROL_TIMEOUT = 10.0
#: How long an open-loop publisher waits for the answers once it has sent everything.
ANSWERS_TIMEOUT = 60.0
SERVER_START_TIMEOUT = 15.0
FD_HEADROOM = 256
HEADER_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 65536
# The sequence number and the send time of one message, found in an SSE event's data or a
# WebSocket frame: the raw payload for Nchan, the hub's JSON envelope around it for the hub.
PAYLOAD_FIELDS = re.compile(rb'"seq":\s*(\d+),\s*"t":\s*(\d+)')
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NCHAN_MODULE_FILE = "ngx_nchan_module.so"
NCHAN_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
NCHAN_MODULE_CONFS = "/usr/share/nginx/modules-available/*.conf"
NGINX_PREFIX = "/usr/share/nginx"  # Debian's compiled-in prefix, for relative load_module paths
# The load generator may have set the pace when it used more than this % of CPU 1 while the
# server used less than SERVER_SATURATED % of CPU 0.
CLIENT_SATURATED = 90.0
SERVER_SATURATED = 90.0
ALL_WORKLOADS = ("throughput-sse", "throughput-ws", "latency-sse", "latency-ws", "memory")
ALL_SERVERS = ("nchan", "hub")
SCRIPT = str(Path(__file__).resolve())


# -- the servers under test ---------------------------------------------------------------------


class Server:
    """What the load generator needs to know about one server under test."""

    label: ClassVar[str]
    publish_ok: ClassVar[frozenset[int]]
    host: str = "127.0.0.1"
    port: int = 0
    tcp_port: int = 0  # the hub's binary TCP protocol, when it serves it

    def pids(self) -> list[int]:
        raise NotImplementedError

    def publish_path(self, channel: str) -> str:
        raise NotImplementedError

    def subscribe_path(self, channel: str, transport: str) -> str:
        raise NotImplementedError

    def info_request(self, channel: str) -> tuple[str, dict[str, str]]:
        raise NotImplementedError

    def subscriber_count(self, info: Any, transport: str) -> int:
        raise NotImplementedError

    def problems(self) -> list[str]:
        """Errors the server logged so far."""
        raise NotImplementedError

    def check_alive(self) -> None:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids())

    def rss_kib(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids())


class NchanServer(Server):
    """nginx with the nchan module, one worker, configured in a fresh temporary folder."""

    label = "Nchan"
    publish_ok = frozenset({201, 202})

    def __init__(self, *, buffer_length: int, connections: int, tmp_root: str | None) -> None:
        self.buffer_length = buffer_length
        self.connections = connections
        self.tmp_root = tmp_root
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._worker: int | None = None

    @property
    def folder(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name)

    def config(self, module: str) -> str:
        tmp = self.folder
        return f"""\
load_module {module};
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;

events {{
    worker_connections {self.connections};
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    nchan_max_reserved_memory 256M;

    server {{
        listen 127.0.0.1:{self.port};

        location ~ ^/pub/([A-Za-z0-9_-]+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
            nchan_message_buffer_length {self.buffer_length};
            nchan_message_timeout 1h;
        }}
        location ~ ^/sse/([A-Za-z0-9_-]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
        }}
        location ~ ^/ws/([A-Za-z0-9_-]+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
        }}
    }}
}}
"""

    def __enter__(self) -> NchanServer:
        nginx = require_tool("nginx")
        module = find_nchan_module()
        self._tmp = tempfile.TemporaryDirectory(prefix="nchan-bench-", dir=self.tmp_root)
        try:
            os.chmod(self.folder, 0o755)  # the worker runs as an unprivileged user
            self.port = free_port()
            conf = self.folder / "nginx.conf"
            conf.write_text(self.config(module))
            self._log = open(self.folder / "nginx.out", "wb")
            self._proc = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(SERVER_CPU),
                    nginx,
                    "-c",
                    str(conf),
                    "-p",
                    f"{self.folder}/",
                    "-g",
                    "daemon off;",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BenchError(f"nginx exited at start; its log:\n{self._log_text()}")
            workers = child_pids(self._proc.pid)
            if len(workers) == 1 and port_open(self.host, self.port):
                self._worker = workers[0]
                return
            time.sleep(0.05)
        raise BenchError(f"nginx did not start in {SERVER_START_TIMEOUT:g} s:\n{self._log_text()}")

    def _log_text(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.folder / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def _stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)  # SIGINT: nginx's fast shutdown
        if self._log is not None:
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def pids(self) -> list[int]:
        assert self._proc is not None and self._worker is not None
        return [self._proc.pid, self._worker]

    def publish_path(self, channel: str) -> str:
        return f"/pub/{channel}"

    def subscribe_path(self, channel: str, transport: str) -> str:
        return f"/{transport}/{channel}"

    def info_request(self, channel: str) -> tuple[str, dict[str, str]]:
        return f"/pub/{channel}", {"Accept": "application/json"}

    def subscriber_count(self, info: Any, transport: str) -> int:
        return int(info["subscribers"])

    def problems(self) -> list[str]:
        path = self.folder / "error.log"
        if not path.exists():
            return []
        levels = ("[warn]", "[error]", "[crit]", "[alert]", "[emerg]")
        lines = path.read_text(errors="replace").splitlines()
        return [line for line in lines if any(level in line for level in levels)]

    def check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise BenchError(f"nginx exited early; its log:\n{self._log_text()}")
        if self._worker is None or not Path(f"/proc/{self._worker}").exists():
            raise BenchError(f"the nginx worker is gone; the log:\n{self._log_text()}")


class HubServer(Server):
    """``backchannel serve --store memory://`` (see :class:`hubproc.HubProcess`). Other scripts
    may ask for another store (``store=""``: SQLite in the hub's data folder) and for TCP."""

    label = "backchannel"
    publish_ok = frozenset({201})

    def __init__(
        self,
        *,
        extra_args: Sequence[str],
        tmp_root: str | None,
        store: str = "memory://",
        tcp: bool = False,
    ) -> None:
        store_args = ["--store", store] if store else []
        self.hub = HubProcess(
            extra_args=[
                *store_args,
                "--log-level",
                "warning",
                "--tcp" if tcp else "--no-tcp",
                *extra_args,
            ],
            cpu=SERVER_CPU,
            tmp_root=tmp_root,
        )

    def __enter__(self) -> HubServer:
        self.hub.__enter__()
        host, port = self.hub.url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.tcp_port = self.hub.tcp_port
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.hub.__exit__(exc_type, exc, tb)

    def pids(self) -> list[int]:
        return [self.hub.pid]

    def publish_path(self, channel: str) -> str:
        return f"/v1/channels/{channel}/messages"

    def subscribe_path(self, channel: str, transport: str) -> str:
        return f"/v1/channels/{channel}/{'events' if transport == 'sse' else 'ws'}"

    def info_request(self, channel: str) -> tuple[str, dict[str, str]]:
        return f"/v1/channels/{channel}", {}

    def subscriber_count(self, info: Any, transport: str) -> int:
        return int(info.get("subscribers", {}).get(transport, 0))

    def problems(self) -> list[str]:
        return self.hub.logged_errors()

    def check_alive(self) -> None:
        self.hub.check_alive()


def find_nchan_module() -> str:
    """The path of ``ngx_nchan_module.so``: in nginx's module folder, or named by a Debian
    ``modules-available`` snippet."""
    for folder in NCHAN_MODULE_DIRS:
        candidate = Path(folder) / NCHAN_MODULE_FILE
        if candidate.exists():
            return str(candidate)
    for snippet in sorted(glob.glob(NCHAN_MODULE_CONFS)):
        match = re.search(r"load_module\s+(\S*nchan\S*\.so)\s*;", Path(snippet).read_text())
        if match:
            path = Path(match.group(1))
            path = path if path.is_absolute() else Path(NGINX_PREFIX) / path
            if path.exists():
                return str(path)
    raise BenchError(
        "the nchan module is not installed (on Debian: apt-get install -y nginx-light "
        "libnginx-mod-nchan)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, from ``/proc/PID/task/*/children`` or a scan of ``/proc``."""
    children: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            text = (task / "children").read_text()
            children.extend(int(p) for p in text.split())
        return children
    except OSError:
        pass
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


# -- HTTP/1.1 pieces ----------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """Status code and lower-cased headers of a response head (without the blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class Dechunker:
    """Incremental decoder of an HTTP/1.1 ``Transfer-Encoding: chunked`` body."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._crlf = False  # the CRLF closing a chunk's data is still to come
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        buf = self._pending
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end and not self.finished:
            if self._left:
                take = min(self._left, end - pos)
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self._left -= take
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("chunk data not followed by CRLF")
                pos += 2
                self._crlf = False
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip(), 16)
            pos = eol + 2
            if size == 0:
                self.finished = True
            self._left = size
        del buf[:pos]
        return b"".join(out)


async def http_get(
    host: str, port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One GET on a fresh connection (``Connection: close``): status and body."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    async with asyncio.timeout(CONTROL_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = await reader.read()
        finally:
            writer.close()
    end = data.find(HEADER_END)
    if end < 0:
        raise BenchError(f"GET {path}: incomplete response {data[:200]!r}")
    status, response_headers = parse_head(data[:end])
    body = data[end + len(HEADER_END) :]
    if b"chunked" in response_headers.get(b"transfer-encoding", b"").lower():
        body = Dechunker().feed(body)
    return status, body


# -- subscribers --------------------------------------------------------------------------------


class Run:
    """What the subscribers of one measurement share: what they expect, what they got."""

    def __init__(self, target: int, *, record_latency: bool) -> None:
        self.target = target  # messages each subscriber must receive

        self.subscribers: list[Subscriber] = []
        self.ready = 0  # subscribers whose response head said yes
        self.complete = 0  # subscribers that have received `target` messages
        self.completed_at: float | None = None
        self.all_complete = asyncio.Event()
        # Publish-to-receive times in ns, of the timed subscribers' deliveries, and for each
        # the message's sequence number and the receive time (ns since the epoch).
        self.latencies: array.array[int] | None = array.array("q") if record_latency else None
        self.timed_seqs: array.array[int] = array.array("q")
        self.timed_received: array.array[int] = array.array("q")
        self.stopping = False
        self.released = False

    def one_complete(self) -> None:
        self.complete += 1
        if self.complete == len(self.subscribers):
            self.completed_at = time.perf_counter()
            self.all_complete.set()

    @property
    def received(self) -> int:
        return sum(s.received for s in self.subscribers)

    def release_batches(self) -> None:
        """Let batched subscribers read what is left, however little."""
        if not self.released:
            self.released = True
            for subscriber in self.subscribers:
                subscriber.stop_batching()

    def close(self) -> None:
        self.stopping = True
        for subscriber in self.subscribers:
            subscriber.close()


class Subscriber(asyncio.Protocol):
    """One subscriber connection: sends its request, checks the response head, then hands the
    body to :meth:`body_received`, which finds messages and passes them to :meth:`deliver`."""

    def __init__(self, run: Run, request: bytes, *, timed: bool, batch_bytes: int) -> None:
        self.run = run
        self.request = request
        self.latencies = run.latencies if timed else None
        self.batch_bytes = batch_bytes
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self.status = 0
        self.received = 0
        self.next_seq = 0
        self.out_of_order = 0  # messages not numbered one more than the previous one
        self.unparsed = 0  # events or frames with no sequence number in them
        self.complete = False
        self.problem: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.status:
            self.body_received(data, time.time_ns())
            return
        self._head += data
        end = self._head.find(HEADER_END)
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self.fail("response head too long")
            return
        head = bytes(self._head[:end])
        rest = bytes(self._head[end + len(HEADER_END) :])
        self._head.clear()
        try:
            status, headers = parse_head(head)
            self.status = status
            problem = self.check_head(status, headers)
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            self.fail(f"{problem}: {head[:300]!r} {rest[:300]!r}")
            return
        self.run.ready += 1
        if self.batch_bytes and not self.run.released:
            self._set_low_water_mark(self.batch_bytes)
        if rest:
            self.body_received(rest, time.time_ns())

    def check_head(self, status: int, headers: dict[bytes, bytes]) -> str | None:
        raise NotImplementedError

    def body_received(self, data: bytes, now: int) -> None:
        raise NotImplementedError

    def deliver(self, count: int, found: list[tuple[bytes, bytes]], now: int) -> None:
        """Take ``count`` events or frames, of which ``found`` are (sequence, send time)."""
        if len(found) != count:
            self.unparsed += count - len(found)
        expected = self.next_seq
        latencies = self.latencies
        if latencies is None:
            for seq_text, _ in found:
                seq = int(seq_text)
                if seq != expected:
                    self.out_of_order += 1
                expected = seq + 1
        else:
            seqs = self.run.timed_seqs
            received = self.run.timed_received
            for seq_text, sent in found:
                seq = int(seq_text)
                if seq != expected:
                    self.out_of_order += 1
                expected = seq + 1
                latencies.append(now - int(sent))
                seqs.append(seq)
                received.append(now)
        self.next_seq = expected
        self.received += len(found)
        if not self.complete and self.received >= self.run.target:
            self.complete = True
            self.run.one_complete()

    def _set_low_water_mark(self, size: int) -> None:
        """``SO_RCVLOWAT``: the kernel reports the socket readable only once ``size`` bytes
        wait in it, so that a subscriber reads many messages per wake-up."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)

    def stop_batching(self) -> None:
        if self.batch_bytes:
            self._set_low_water_mark(1)

    def fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.run.stopping and self.problem is None:
            self.problem = f"closed by the server after {self.received} messages ({exc or 'EOF'})"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SSESubscriber(Subscriber):
    """``GET`` with ``Accept: text/event-stream``; events end with a blank line (``\\n\\n``)."""

    def __init__(self, run: Run, host: str, path: str, *, timed: bool, batch_bytes: int) -> None:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n"
        ).encode()
        super().__init__(run, request, timed=timed, batch_bytes=batch_bytes)
        self._buffer = bytearray()
        self._dechunker: Dechunker | None = None

    def check_head(self, status: int, headers: dict[bytes, bytes]) -> str | None:
        if status != 200:
            return f"status {status}"
        if not headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            return f"content-type {headers.get(b'content-type')!r}"
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._dechunker = Dechunker()
        return None

    def body_received(self, data: bytes, now: int) -> None:
        if self._dechunker is not None:
            try:
                data = self._dechunker.feed(data)
            except ValueError as exc:
                self.fail(str(exc))
                return
        buf = self._buffer
        if buf:
            buf += data
            end = buf.rfind(b"\n\n")
            if end < 0:
                return
            block = bytes(buf[: end + 2])
            del buf[: end + 2]
        elif data.endswith(b"\n\n"):
            block = data
        else:
            end = data.rfind(b"\n\n")
            buf += data[end + 2 :] if end >= 0 else data
            if end < 0:
                return
            block = data[: end + 2]
        self.deliver(block.count(b"data:"), PAYLOAD_FIELDS.findall(block), now)


class WSSubscriber(Subscriber):
    """A WebSocket client: the opening handshake, then a reader of (unmasked) server frames."""

    def __init__(self, run: Run, host: str, path: str, *, timed: bool, batch_bytes: int) -> None:
        key = base64.b64encode(os.urandom(16))
        self._accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        super().__init__(run, request, timed=timed, batch_bytes=batch_bytes)
        self._buffer = b""
        self._fragments: list[bytes] = []

    def check_head(self, status: int, headers: dict[bytes, bytes]) -> str | None:
        if status != 101:
            return f"status {status}"
        if headers.get(b"upgrade", b"").lower() != b"websocket":
            return f"upgrade {headers.get(b'upgrade')!r}"
        if headers.get(b"sec-websocket-accept") != self._accept:
            return "wrong Sec-WebSocket-Accept"
        return None

    def body_received(self, data: bytes, now: int) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos, size = 0, len(data)
        payloads: list[bytes] = []
        while size - pos >= 2:
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            if second & 0x80:
                self.fail("a masked frame from the server")
                return
            stop = start + length
            if stop > size:
                break
            pos = stop
            opcode = first & 0x0F
            if opcode <= 2:  # continuation, text, binary
                if not first & 0x80:
                    self._fragments.append(data[start:stop])
                    continue
                payload = data[start:stop]
                if self._fragments:
                    payload = b"".join([*self._fragments, payload])
                    self._fragments.clear()
                payloads.append(payload)
            elif opcode == 9:  # ping
                self.send_frame(10, data[start:stop])
            elif opcode == 8:  # close
                if not self.run.stopping and self.problem is None:
                    reason = data[start:stop]
                    self.problem = f"close frame after {self.received} messages: {reason!r}"
                self.send_frame(8, data[start : start + 2])
                self.close()
                return
        if pos < size:
            self._buffer = data[pos:]
        if payloads:
            block = payloads[0] if len(payloads) == 1 else b"\n".join(payloads)
            self.deliver(len(payloads), PAYLOAD_FIELDS.findall(block), now)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """A masked control frame (payload under 126 bytes), as a client must send."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload[:125]))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(masked)]) + mask + masked)


class TCPSubscriber(Subscriber):
    """A client of the hub's binary TCP protocol: ``HELLO``, ``SUBSCRIBE``, then ``MESSAGE``
    frames, read with the sans-I/O codec of ``backchannel.wire.frames``."""

    def __init__(self, run: Run, channel: str, *, timed: bool, batch_bytes: int) -> None:
        from backchannel.wire import frames

        super().__init__(run, b"", timed=timed, batch_bytes=batch_bytes)
        self._frames = frames
        self._codec = frames.Connection(frames.Role.CLIENT)
        self.request = self._codec.send(frames.Hello(versions=(1,))) + frames.encode(
            frames.Subscribe(request=1, channel=channel, after=None)
        )

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        frames = self._frames
        codec = self._codec
        try:
            codec.receive_data(data)
            count = 0
            found: list[tuple[bytes, bytes]] = []
            while (event := codec.next_event()) is not frames.NEED_DATA:
                if isinstance(event, frames.Message):
                    count += 1
                    match = PAYLOAD_FIELDS.search(event.data)
                    if match:
                        found.append((match.group(1), match.group(2)))
                elif isinstance(event, frames.Ok):
                    self.status = 200
                    self.run.ready += 1
                    if self.batch_bytes and not self.run.released:
                        self._set_low_water_mark(self.batch_bytes)
                elif isinstance(event, frames.Error):
                    self.fail(f"ERROR {event.type}: {event.detail}")
                    return
                elif event is frames.CONNECTION_CLOSED:
                    break
        except frames.ProtocolError as exc:
            self.fail(str(exc))
            return
        if count:
            self.deliver(count, found, now)

    def check_head(self, status: int, headers: dict[bytes, bytes]) -> str | None:
        raise NotImplementedError  # no HTTP here

    def body_received(self, data: bytes, now: int) -> None:
        raise NotImplementedError


async def open_subscribers(
    server: Server,
    channel: str,
    transport: str,
    count: int,
    run: Run,
    *,
    timed: int | None = None,
    batch_bytes: int = 0,
) -> None:
    """Connect ``count`` subscribers (added to ``run.subscribers`` as they connect).

    ``timed`` of them (all when None), spread evenly over the connection order, record the
    latency of their deliveries and read every message as soon as it arrives; the others read
    only once ``batch_bytes`` wait in their socket (when not 0), until :meth:`Run.release_batches`.
    """
    loop = asyncio.get_running_loop()
    path = server.subscribe_path(channel, transport)
    authority = f"{server.host}:{server.port}"
    kind = SSESubscriber if transport == "sse" else WSSubscriber
    port = server.port
    if transport == "tcp":
        if not server.tcp_port:
            raise BenchError(f"{server.label} serves no TCP protocol")
        port = server.tcp_port
    probes = count if timed is None else min(timed, count)
    timed_indices = {k * count // probes for k in range(probes)} if probes else set()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(index: int) -> None:
        is_timed = index in timed_indices
        batch = 0 if is_timed else spread_batch(batch_bytes, index)

        def factory() -> Subscriber:
            if transport == "tcp":
                return TCPSubscriber(run, channel, timed=is_timed, batch_bytes=batch)
            return kind(run, authority, path, timed=is_timed, batch_bytes=batch)

        async with gate:
            _, protocol = await loop.create_connection(factory, server.host, port)
            run.subscribers.append(protocol)

    try:
        async with asyncio.TaskGroup() as group:
            for index in range(count):
                group.create_task(one(index))
    except ExceptionGroup as errors:
        raise BenchError(f"could not connect a subscriber: {errors.exceptions[0]!r}") from None


async def subscriber_count(server: Server, channel: str, transport: str) -> int:
    path, headers = server.info_request(channel)
    status, body = await http_get(server.host, server.port, path, headers)
    if status != 200:
        raise BenchError(f"channel info {path} answered {status}: {body[:300]!r}")
    return server.subscriber_count(json.loads(body), transport)


async def wait_subscribed(
    server: Server, channel: str, transport: str, run: Run, count: int, limit: float
) -> float:
    """Wait until every subscriber's response head said yes and the server reports ``count``
    subscribers on ``channel``; returns the seconds waited."""
    started = time.perf_counter()
    deadline = started + limit
    reported = 0
    while True:
        failed = [s.problem for s in run.subscribers if s.problem]
        if failed:
            raise BenchError(f"{len(failed)} subscribers failed, first: {failed[0]}")
        if run.ready >= count:
            reported = await subscriber_count(server, channel, transport)
            if reported == count:
                return time.perf_counter() - started
            if reported > count:
                raise BenchError(f"the server reports {reported} subscribers, not {count}")
        if time.perf_counter() > deadline:
            raise BenchError(
                f"after {limit:g} s, {run.ready} of {count} subscribers were answered and "
                f"the server reported {reported}"
            )
        await asyncio.sleep(0.05)


# -- the publisher (a child process) ------------------------------------------------------------


def payload(seq: int, sent_ns: int, size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes carrying a sequence number and a send time."""
    head = f'{{"seq":{seq},"t":{sent_ns},"pad":"'
    pad = size - len(head) - 2
    if pad < 0:
        raise BenchError(f"--message-bytes {size} is too small for the payload {head}")
    return (head + "x" * pad + '"}').encode()


def publisher_child(spec_text: str) -> int:
    """The publisher: POSTs on one keep-alive connection, at a fixed rate or as fast as the
    answers come. With ``open`` (and a rate) each request is written at its scheduled time,
    pipelined behind those not answered yet, and a thread reads the answers; else each waits
    for the previous answer. Prints ``ready`` once connected, starts on a ``go`` line from
    stdin and prints one JSON line with what happened."""
    spec = json.loads(spec_text)
    host: str = spec["host"]
    port: int = spec["port"]
    count: int = spec["count"]
    rate: float = spec["rate"]
    size: int = spec["size"]
    ok = set(spec["ok"])
    head = (
        f"POST {spec['path']} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()

    def connect() -> socket.socket:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    sock = connect()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    if spec.get("open") and rate:
        return open_loop_publisher(sock, head, count=count, rate=rate, size=size, ok=ok)
    buffer = bytearray()
    statuses: dict[int, int] = {}
    first_error: str | None = None
    reconnects = 0
    late = 0
    cpu_started = time.process_time()
    started_ns = time.time_ns()
    started = time.perf_counter()
    for seq in range(count):
        if rate:
            delay = started + seq / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.001:
                late += 1
        sock.sendall(head + payload(seq, time.time_ns(), size))
        status, body, close = read_response(sock, buffer)
        statuses[status] = statuses.get(status, 0) + 1
        if status not in ok and first_error is None:
            first_error = f"message {seq}: status {status}: {body[:300]!r}"
        if close:
            sock.close()
            sock = connect()
            reconnects += 1
    elapsed = time.perf_counter() - started
    sock.close()
    return report_published(
        count,
        statuses,
        ok,
        first_error=first_error,
        reconnects=reconnects,
        late=late,
        elapsed_s=elapsed,
        started_ns=started_ns,
        cpu_s=time.process_time() - cpu_started,
    )


def open_loop_publisher(
    sock: socket.socket, head: bytes, *, count: int, rate: float, size: int, ok: set[int]
) -> int:
    """:func:`publisher_child` at a fixed rate, open loop: the schedule alone decides when a
    request is written, so a server that answers slowly gets the same offered load as one that
    answers at once, and what its publishes wait shows in the delivery latency (no
    "coordinated omission"). The answers come back in order on the same connection."""
    statuses: dict[int, int] = {}
    failure: list[str] = []
    first_error: list[str] = []

    def read_answers() -> None:
        buffer = bytearray()
        try:
            for seq in range(count):
                status, body, close = read_response(sock, buffer)
                statuses[status] = statuses.get(status, 0) + 1
                if status not in ok and not first_error:
                    first_error.append(f"message {seq}: status {status}: {body[:300]!r}")
                if close and seq + 1 < count:
                    raise ConnectionError(
                        f"the server closed the connection after answering message {seq}; "
                        "the requests pipelined behind it were lost"
                    )
        except Exception as exc:  # reported in the result line
            failure.append(f"{type(exc).__name__}: {exc}")

    reader = threading.Thread(target=read_answers, name="answers", daemon=True)
    late = 0
    cpu_started = time.process_time()
    started_ns = time.time_ns()
    started = time.perf_counter()
    reader.start()
    for seq in range(count):
        delay = started + seq / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.001:
            late += 1
        if failure:
            break
        sock.sendall(head + payload(seq, time.time_ns(), size))
    reader.join(timeout=ANSWERS_TIMEOUT)
    elapsed = time.perf_counter() - started
    if reader.is_alive():
        failure.append(f"not every publish was answered within {ANSWERS_TIMEOUT:g} s")
    sock.close()
    return report_published(
        count,
        statuses,
        ok,
        first_error=(failure + first_error or [None])[0],
        reconnects=0,
        late=late,
        elapsed_s=elapsed,
        started_ns=started_ns,
        cpu_s=time.process_time() - cpu_started,
    )


def report_published(
    count: int,
    statuses: dict[int, int],
    ok: set[int],
    *,
    first_error: str | None,
    reconnects: int,
    late: int,
    elapsed_s: float,
    started_ns: int,
    cpu_s: float,
) -> int:
    """Print the publisher's one result line (read by :class:`Publisher`)."""
    result = {
        "published": count,
        "acknowledged": sum(n for s, n in statuses.items() if s in ok),
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "first_error": first_error,
        "reconnects": reconnects,
        "late": late,
        "elapsed_s": elapsed_s,
        "started_ns": started_ns,
        "cpu_s": cpu_s,
    }
    print(json.dumps(result), flush=True)
    return 0


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes, bool]:
    """Read one response with a ``Content-Length`` body: status, body, and whether the server
    will close the connection."""
    while (end := buffer.find(HEADER_END)) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the publisher's connection")
        buffer += chunk
    status, headers = parse_head(bytes(buffer[:end]))
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        raise ValueError("a chunked answer to a publish; this client wants a Content-Length")
    total = end + len(HEADER_END) + int(headers.get(b"content-length", b"0"))
    while len(buffer) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the publisher's connection")
        buffer += chunk
    body = bytes(buffer[end + len(HEADER_END) : total])
    del buffer[:total]
    return status, body, headers.get(b"connection", b"").lower() == b"close"


class Publisher:
    """The publisher child process, seen from the load generator."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.outcome: asyncio.Task[dict[str, Any]] | None = None

    @classmethod
    async def start(
        cls,
        server: Server,
        channel: str,
        *,
        count: int,
        rate: float,
        size: int,
        open_loop: bool = False,
    ) -> Publisher:
        spec = {
            "open": open_loop,
            "host": server.host,
            "port": server.port,
            "path": server.publish_path(channel),
            "count": count,
            "rate": rate,
            "size": size,
            "ok": sorted(server.publish_ok),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--publisher-child",
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        publisher = cls(proc)
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(CONTROL_TIMEOUT):
                line = await proc.stdout.readline()
            if line.strip() != b"ready":
                raise BenchError(f"the publisher did not start: {await publisher.errors()}")
        except BaseException:
            await publisher.stop()
            raise
        return publisher

    async def errors(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.proc.wait()
        if self.proc.returncode is None:
            return "(still running)"
        return (await self.proc.stderr.read()).decode(errors="replace")[-2000:]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.outcome = asyncio.create_task(self._outcome())

    async def _outcome(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the publisher failed: {await self.errors()}")
        result: dict[str, Any] = json.loads(line)
        await self.proc.wait()
        return result

    async def stop(self) -> None:
        if self.outcome is not None and not self.outcome.done():
            self.outcome.cancel()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


# -- the workloads ------------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    server: str
    round: int = 1
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, float | int | None] = field(default_factory=dict)


@dataclass
class Measured:
    """Clock and CPU readings around one measured stretch."""

    wall_s: float
    server_cpu_s: float
    client_cpu_s: float  # this process: the subscribers
    client_user_s: float
    client_system_s: float
    cpu_busy_pct: dict[int, float]  # per CPU, by every process on the machine


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """(busy, all) clock ticks of each CPU since boot, from ``/proc/stat``."""
    ticks: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        idle = numbers[3] + numbers[4]
        ticks[int(name[3:])] = (sum(numbers) - idle - numbers[7], sum(numbers))
    return ticks


def cpu_busy_pct(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, float]:
    busy: dict[int, float] = {}
    for cpu, (busy_after, all_after) in after.items():
        busy_before, all_before = before.get(cpu, (0, 0))
        elapsed = all_after - all_before
        busy[cpu] = 100 * (busy_after - busy_before) / elapsed if elapsed else 0.0
    return busy


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No cyclic garbage collection while measuring (what exists now is frozen out of it)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def nonce() -> str:
    return uuid.uuid4().hex[:12]


async def wait_delivered(run: Run, publisher: Publisher, drain: float, limit: float) -> None:
    """Until every subscriber has every message, or the publisher failed, or ``drain`` seconds
    passed after the publisher finished, or ``limit`` seconds in all."""
    deadline = time.perf_counter() + limit
    published_at: float | None = None
    while not run.all_complete.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.1):
                await run.all_complete.wait()
        assert publisher.outcome is not None
        now = time.perf_counter()
        if publisher.outcome.done():
            if publisher.outcome.exception() is not None:
                return
            run.release_batches()
            published_at = published_at or now
            if now - published_at > drain:
                return
        if now > deadline:
            return
        if any(s.problem for s in run.subscribers):
            return


async def push_case(
    server: Server, workload: str, args: argparse.Namespace, result: Result
) -> None:
    """A throughput or latency measure, as ``workload`` says."""
    kind, transport = workload.split("-")
    latency = kind == "latency"
    subscribers = args.latency_subscribers if latency else args.subscribers
    count = round(args.rate * args.duration) if latency else args.messages
    rate = args.rate if latency else 0.0
    channel = f"bench-{workload}-{nonce()}"
    run = Run(count, record_latency=latency)
    publisher: Publisher | None = None
    try:
        await open_subscribers(
            server,
            channel,
            transport,
            subscribers,
            run,
            timed=args.latency_probes if latency else None,
            batch_bytes=args.batch_bytes if latency else 0,
        )
        setup_s = await wait_subscribed(
            server, channel, transport, run, subscribers, args.connect_timeout
        )
        await asyncio.sleep(args.settle)
        publisher = await Publisher.start(
            server,
            channel,
            count=count,
            rate=rate,
            size=args.message_bytes,
            open_loop=latency and args.publisher == "open",
        )
        limit = args.duration + args.timeout if latency else args.timeout
        with quiet_gc():
            server_cpu = server.cpu_seconds()
            client_cpu = time.process_time()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            ticks = cpu_ticks()
            started = time.perf_counter()
            publisher.go()
            await wait_delivered(run, publisher, args.drain, limit)
            ended = run.completed_at or time.perf_counter()
            usage_end = resource.getrusage(resource.RUSAGE_SELF)
            busy = cpu_busy_pct(ticks, cpu_ticks())
            measured = Measured(
                wall_s=ended - started,
                server_cpu_s=server.cpu_seconds() - server_cpu,
                client_cpu_s=time.process_time() - client_cpu,
                client_user_s=usage_end.ru_utime - usage.ru_utime,
                client_system_s=usage_end.ru_stime - usage.ru_stime,
                cpu_busy_pct=busy,
            )
        assert publisher.outcome is not None
        if not publisher.outcome.done():
            async with asyncio.timeout(args.drain):
                await asyncio.shield(publisher.outcome)
        published = publisher.outcome.result()
    finally:
        run.close()
        if publisher is not None:
            await publisher.stop()
    judge_push(run, published, subscribers, count, result)
    received = run.received
    client_cpu_s = measured.client_cpu_s + published["cpu_s"]
    metrics: dict[str, float | int | None] = {
        "subscribers": subscribers,
        "messages": count,
        "deliveries_expected": subscribers * count,
        "deliveries": received,
        "wall_s": measured.wall_s,
        "publish_s": published["elapsed_s"],
        "publishes_per_s": count / published["elapsed_s"] if published["elapsed_s"] else None,
        "deliveries_per_s": received / measured.wall_s if measured.wall_s else None,
        "server_cpu_s": measured.server_cpu_s,
        "deliveries_per_server_cpu_s": (
            received / measured.server_cpu_s if measured.server_cpu_s else None
        ),
        "server_cpu_pct": 100 * measured.server_cpu_s / measured.wall_s,
        "client_cpu_s": client_cpu_s,
        "client_cpu_pct": 100 * client_cpu_s / measured.wall_s,
        "publisher_cpu_s": published["cpu_s"],
        "subscribers_cpu_user_s": measured.client_user_s,
        "subscribers_cpu_system_s": measured.client_system_s,
        "subscribe_s": setup_s,
        "publisher_reconnects": published["reconnects"],
        "cpu0_busy_pct": measured.cpu_busy_pct.get(SERVER_CPU),
        "cpu1_busy_pct": measured.cpu_busy_pct.get(CLIENT_CPU),
    }
    if latency:
        assert run.latencies is not None
        values = sorted(run.latencies)
        metrics["timed_subscribers"] = sum(1 for s in run.subscribers if s.latencies is not None)
        metrics["timed_deliveries"] = len(values)
        metrics["publishes_late"] = published["late"]
        for name, q in (("p50", 50.0), ("p99", 99.0), ("p999", 99.9)):
            metrics[f"latency_{name}_ms"] = percentile(values, q) / 1e6 if values else None
        metrics["latency_max_ms"] = values[-1] / 1e6 if values else None
        metrics["latency_min_ms"] = values[0] / 1e6 if values else None
        # The same deliveries timed from when the schedule wanted each message sent: this adds
        # the time a message waited for the publisher (itself waiting for the server's previous
        # acknowledgements), which the send time inside the message leaves out.
        start_ns, interval_ns = published["started_ns"], 1e9 / args.rate
        scheduled = sorted(
            received - (start_ns + seq * interval_ns)
            for seq, received in zip(run.timed_seqs, run.timed_received, strict=True)
        )
        for name, q in (("p50", 50.0), ("p99", 99.0)):
            metrics[f"scheduled_latency_{name}_ms"] = (
                percentile(scheduled, q) / 1e6 if scheduled else None
            )
        metrics["scheduled_latency_max_ms"] = scheduled[-1] / 1e6 if scheduled else None
        achieved = metrics["publishes_per_s"]
        if achieved is not None and float(achieved) < 0.95 * args.rate:
            result.warnings.append(
                f"the publisher reached only {achieved:.1f} of the {args.rate:g} messages/s "
                "asked: the server acknowledged publishes more slowly than that (the latency "
                "rows timed from the send time are at that lower rate; those timed from the "
                "schedule show the backlog)"
            )
    client_pct = float(metrics["client_cpu_pct"] or 0)
    server_pct = float(metrics["server_cpu_pct"] or 0)
    if client_pct > CLIENT_SATURATED and server_pct < SERVER_SATURATED:
        result.warnings.append(
            f"the load generator used {client_pct:.0f}% of CPU {CLIENT_CPU} and the server "
            f"{server_pct:.0f}% of CPU {SERVER_CPU}: the load generator may have set the pace"
        )
    result.metrics = metrics


def judge_push(
    run: Run, published: dict[str, Any], subscribers: int, count: int, result: Result
) -> None:
    problems = result.problems
    if published["acknowledged"] != count:
        problems.append(
            f"{count - published['acknowledged']} of {count} publishes not acknowledged "
            f"(statuses {published['statuses']}; {published['first_error']})"
        )
    if len(run.subscribers) != subscribers:
        problems.append(f"only {len(run.subscribers)} of {subscribers} subscribers connected")
    short = [s for s in run.subscribers if s.received < count]
    if short:
        missing = sum(count - s.received for s in short)
        problems.append(
            f"{len(short)} subscribers missed messages ({missing} deliveries lost; "
            f"the fewest received: {min(s.received for s in short)} of {count})"
        )
    extra = [s for s in run.subscribers if s.received > count]
    if extra:
        problems.append(f"{len(extra)} subscribers received more than {count} messages")
    disorder = sum(s.out_of_order for s in run.subscribers)
    if disorder:
        problems.append(f"{disorder} deliveries out of order or duplicated")
    unparsed = sum(s.unparsed for s in run.subscribers)
    if unparsed:
        problems.append(f"{unparsed} events or frames without a sequence number")
    failures = [s.problem for s in run.subscribers if s.problem]
    if failures:
        problems.append(f"{len(failures)} subscribers failed, first: {failures[0]}")


async def memory_case(server: Server, args: argparse.Namespace, result: Result) -> None:
    count = args.idle_subscribers
    warmup = Run(1, record_latency=False)
    run = Run(1, record_latency=False)
    warm_channel = f"bench-warmup-{nonce()}"
    channel = f"bench-memory-{nonce()}"
    try:
        if args.memory_warmup:
            await open_subscribers(server, warm_channel, "sse", args.memory_warmup, warmup)
            await wait_subscribed(
                server, warm_channel, "sse", warmup, args.memory_warmup, args.connect_timeout
            )
        await asyncio.sleep(args.settle)
        before = server.rss_kib()
        started = time.perf_counter()
        await open_subscribers(server, channel, "sse", count, run)
        timeout = args.connect_timeout + count / 100
        setup_s = await wait_subscribed(server, channel, "sse", run, count, timeout)
        await asyncio.sleep(args.settle)
        after = server.rss_kib()
        still = await subscriber_count(server, channel, "sse")
        if still != count:
            result.problems.append(f"{still} of {count} subscribers left after the settle time")
        failures = [s.problem for s in run.subscribers if s.problem]
        if failures:
            result.problems.append(f"{len(failures)} subscribers failed, first: {failures[0]}")
        result.metrics = {
            "subscribers": count,
            "warmup_subscribers": args.memory_warmup,
            "rss_before_mib": before / 1024,
            "rss_after_mib": after / 1024,
            "rss_growth_mib": (after - before) / 1024,
            "rss_kib_per_subscriber": (after - before) / count,
            "subscribe_s": setup_s,
            "connect_and_subscribe_s": time.perf_counter() - started - args.settle,
        }
    finally:
        run.close()
        warmup.close()


def wait_until_quiet(max_wait: float, threshold: float) -> str | None:
    """Wait (up to ``max_wait`` seconds) until, over one second, neither CPU 0 nor CPU 1 is busier
    than ``threshold`` percent with other work; a warning when it never was."""
    deadline = time.monotonic() + max_wait
    busiest = 0.0
    while True:
        before = cpu_ticks()
        time.sleep(1.0)
        busy = cpu_busy_pct(before, cpu_ticks())
        busiest = max(busy.get(SERVER_CPU, 0.0), busy.get(CLIENT_CPU, 0.0))
        if busiest <= threshold:
            return None
        if time.monotonic() >= deadline:
            return f"other processes kept a CPU {busiest:.0f}% busy just before this run"
        print(f"  waiting for a quiet machine (a CPU is {busiest:.0f}% busy)", file=sys.stderr)
        time.sleep(2.0)


def run_case(
    runner: asyncio.Runner, server_key: str, workload: str, args: argparse.Namespace
) -> Result:
    server: NchanServer | HubServer
    if server_key == "nchan":
        buffer_length = max(args.messages, round(args.rate * args.duration)) + 100
        connections = max(args.subscribers, args.latency_subscribers, args.idle_subscribers)
        server = NchanServer(
            buffer_length=buffer_length,
            # nchan holds more connections than there are clients: leave plenty of room, up to
            # the limit on open files that nginx inherits.
            connections=min(
                2 * (connections + args.memory_warmup) + FD_HEADROOM,
                resource.getrlimit(resource.RLIMIT_NOFILE)[1] - FD_HEADROOM,
            ),
            tmp_root=args.tmp_dir,
        )
    else:
        server = HubServer(extra_args=args.hub_arg, tmp_root=args.tmp_dir)
    result = Result(workload=workload, server=server.label)
    print(f"{workload}: {server.label}...", file=sys.stderr, flush=True)
    if args.quiet_wait > 0:
        warning = wait_until_quiet(args.quiet_wait, args.quiet_threshold)
        if warning:
            result.warnings.append(warning)
    try:
        with server:
            try:
                if workload == "memory":
                    runner.run(memory_case(server, args, result))
                else:
                    runner.run(push_case(server, workload, args, result))
                server.check_alive()
            finally:
                logged = server.problems()
                if logged:
                    result.problems.append(
                        f"{len(logged)} error lines logged, first: {logged[0]}; last: {logged[-1]}"
                    )
    except (BenchError, OSError, TimeoutError, ValueError) as exc:
        result.problems.insert(0, f"{type(exc).__name__}: {exc}")
    result.ok = not result.problems
    status = "ok" if result.ok else "FAILED: " + "; ".join(result.problems)
    print(f"  {status}", file=sys.stderr, flush=True)
    return result


# -- the report ---------------------------------------------------------------------------------

# (label, metric key, format) per workload kind; a ratio is shown for every numeric metric.
PUSH_ROWS: list[tuple[str, str, str]] = [
    ("deliveries (subscribers x messages)", "deliveries", "{:,.0f}"),
    ("**deliveries per server CPU-second**", "deliveries_per_server_cpu_s", "{:,.0f}"),
    ("server CPU s", "server_cpu_s", "{:.2f}"),
    ("wall s (first publish to last delivery)", "wall_s", "{:.2f}"),
    ("deliveries per wall second", "deliveries_per_s", "{:,.0f}"),
    ("publishes per second (one publisher)", "publishes_per_s", "{:,.0f}"),
    ("server CPU % (of CPU 0)", "server_cpu_pct", "{:.0f}%"),
    ("load generator CPU % (of CPU 1)", "client_cpu_pct", "{:.0f}%"),
    ("CPU 0 / CPU 1 busy %, all processes", "cpu_busy", ""),
]
LATENCY_ROWS: list[tuple[str, str, str]] = [
    ("deliveries (subscribers x messages)", "deliveries", "{:,.0f}"),
    ("timed deliveries (of timed subscribers)", "timed_deliveries", "{:,.0f}"),
    ("**p50 ms**", "latency_p50_ms", "{:.2f}"),
    ("**p99 ms**", "latency_p99_ms", "{:.2f}"),
    ("p99.9 ms", "latency_p999_ms", "{:.2f}"),
    ("**max ms**", "latency_max_ms", "{:.2f}"),
    ("p50 ms from the scheduled send time", "scheduled_latency_p50_ms", "{:.2f}"),
    ("p99 ms from the scheduled send time", "scheduled_latency_p99_ms", "{:.2f}"),
    ("max ms from the scheduled send time", "scheduled_latency_max_ms", "{:.2f}"),
    ("publishes per second (achieved)", "publishes_per_s", "{:,.1f}"),
    ("publishes sent over 1 ms behind schedule", "publishes_late", "{:,.0f}"),
    ("server CPU % (of CPU 0)", "server_cpu_pct", "{:.0f}%"),
    ("load generator CPU % (of CPU 1)", "client_cpu_pct", "{:.0f}%"),
    ("CPU 0 / CPU 1 busy %, all processes", "cpu_busy", ""),
]
MEMORY_ROWS: list[tuple[str, str, str]] = [
    ("idle SSE subscribers", "subscribers", "{:,.0f}"),
    ("RSS before MiB", "rss_before_mib", "{:.1f}"),
    ("RSS after MiB", "rss_after_mib", "{:.1f}"),
    ("**RSS growth KiB per subscriber**", "rss_kib_per_subscriber", "{:.2f}"),
    ("connect + subscribe s", "connect_and_subscribe_s", "{:.2f}"),
]


def workload_title(workload: str, args: argparse.Namespace) -> str:
    if workload.startswith("throughput"):
        transport = "SSE" if workload.endswith("sse") else "WebSocket"
        return (
            f"Throughput, {transport}: {args.subscribers} subscribers, one publisher sends "
            f"{args.messages} messages of {args.message_bytes} bytes"
        )
    if workload.startswith("latency"):
        transport = "SSE" if workload.endswith("sse") else "WebSocket"
        return (
            f"Latency, {transport}: {args.latency_subscribers} subscribers, {args.rate:g} "
            f"messages/s of {args.message_bytes} bytes for {args.duration:g} s"
        )
    return f"Idle memory: {args.idle_subscribers} SSE subscribers"


def report(results: list[Result], args: argparse.Namespace) -> str:
    out: list[str] = []
    labels = {"nchan": NchanServer.label, "hub": HubServer.label}
    for workload in args.workload_list:
        runs = {
            label: [r for r in results if r.workload == workload and r.server == label]
            for label in labels.values()
        }
        if not any(runs.values()):
            continue
        rows_spec = (
            MEMORY_ROWS
            if workload == "memory"
            else LATENCY_ROWS
            if workload.startswith("latency")
            else PUSH_ROWS
        )
        nchan = runs[labels["nchan"]]
        hub = runs[labels["hub"]]
        rows: list[list[str]] = []
        for label, key, fmt in rows_spec:
            if key == "cpu_busy":
                rows.append([label, _busy(nchan), _busy(hub), ""])
                continue
            a = median_metric(nchan, key)
            b = median_metric(hub, key)
            ratio = f"{b / a:.2f}" if a and b is not None else "-"
            if label.startswith("**") and args.repeat > 1:
                cells = [_fmt_spread(nchan, key, fmt), _fmt_spread(hub, key, fmt)]
            else:
                cells = [_fmt(a, fmt), _fmt(b, fmt)]
            rows.append([label, *cells, ratio])
        rows.append(["check", _check(nchan), _check(hub), ""])
        out.append(f"### {workload_title(workload, args)}\n")
        if args.repeat > 1:
            out.append(
                f"Medians of {args.repeat} runs per server (runs alternate between the "
                "servers); bold rows also show the lowest and highest run.\n"
            )
        out.append(
            markdown_table(["", labels["nchan"], labels["hub"], "ratio backchannel / Nchan"], rows)
        )
        for r in [*nchan, *hub]:
            tag = f"{r.server}, run {r.round}" if args.repeat > 1 else r.server
            for line in r.problems:
                out.append(f"- {tag}: {line[:600]}")
            for line in r.warnings:
                out.append(f"- {tag} (warning): {line[:600]}")
        out.append("")
    return "\n".join(out)


def median_metric(runs: list[Result], key: str) -> float | None:
    """The median of a metric over the runs that passed their checks (over all runs when none
    did)."""
    chosen = [r for r in runs if r.ok] or runs
    values = [float(v) for r in chosen if (v := r.metrics.get(key)) is not None]
    return statistics.median(values) if values else None


def _fmt_spread(runs: list[Result], key: str, fmt: str) -> str:
    chosen = [r for r in runs if r.ok] or runs
    values = [float(v) for r in chosen if (v := r.metrics.get(key)) is not None]
    if not values:
        return "-"
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt.format(min(values))} - {fmt.format(max(values))})"


def _fmt(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _busy(runs: list[Result]) -> str:
    cpu0 = median_metric(runs, "cpu0_busy_pct")
    cpu1 = median_metric(runs, "cpu1_busy_pct")
    if cpu0 is None or cpu1 is None:
        return "-"
    return f"{cpu0:.0f}% / {cpu1:.0f}%"


def _check(runs: list[Result]) -> str:
    if not runs:
        return "-"
    failed = sum(1 for r in runs if not r.ok)
    if not failed:
        return "ok" if len(runs) == 1 else f"ok ({len(runs)} runs)"
    return "FAILED" if len(runs) == 1 else f"FAILED ({failed} of {len(runs)} runs)"


def versions() -> dict[str, str]:
    """nginx, the nchan package and the hub's git commit, for the JSON."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=True)
        found["nginx"] = out.stderr.strip().removeprefix("nginx version: ")
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"],
            capture_output=True,
            text=True,
            check=True,
        )
        found["libnginx-mod-nchan"] = out.stdout.strip()
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "-C", str(here), "log", "-1", "--format=%h", "--", "../src"],
            capture_output=True,
            text=True,
            check=True,
        )
        found["hub_src_commit"] = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "../src"],
            capture_output=True,
            text=True,
            check=True,
        )
        found["hub_src_uncommitted_changes"] = "yes" if dirty.stdout.strip() else "no"
    return found


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Push delivery (SSE, WebSocket) of the backchannel hub against Nchan, side "
        "by side: throughput per server CPU-second, publish-to-delivery latency and idle memory "
        f"per subscriber. Servers run on CPU {SERVER_CPU}, the load generator on CPU "
        f"{CLIENT_CPU}. Prints markdown tables with the ratio backchannel / Nchan; exits 1 if "
        "a check failed (a lost, duplicated or reordered message, a failed publish...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated, from {', '.join(ALL_WORKLOADS)}",
    )
    parser.add_argument(
        "--servers", default=",".join(ALL_SERVERS), help="comma-separated: nchan, hub"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each workload per server (alternating between the servers); the tables "
        "show medians",
    )
    parser.add_argument(
        "--subscribers", type=int, default=1000, help="subscribers in the throughput workloads"
    )
    parser.add_argument(
        "--messages", type=int, default=1000, help="messages published in a throughput workload"
    )
    parser.add_argument(
        "--message-bytes", type=int, default=100, help="size of each published JSON body"
    )
    parser.add_argument(
        "--latency-subscribers", type=int, default=1000, help="subscribers in the latency runs"
    )
    parser.add_argument(
        "--rate", type=float, default=200.0, help="messages per second in the latency runs"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of publishing in the latency runs"
    )
    parser.add_argument(
        "--publisher",
        choices=("open", "closed"),
        default="open",
        help="latency runs: 'open' writes each publish at its scheduled time, pipelined behind "
        "those not answered yet (the offered rate is the same for every server, and a publish "
        "that waits in the server is timed); 'closed' sends each publish only once the "
        "previous one is answered (a server that answers after its fan-out slows the "
        "publisher down, and that wait is not in the latency from the send time)",
    )
    parser.add_argument(
        "--latency-probes",
        type=int,
        default=100,
        help="latency runs: subscribers (spread evenly over the connection order) that read "
        "every message at once and time it; the others read in batches (--batch-bytes). "
        "Equal to --latency-subscribers: every delivery is timed",
    )
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=16384,
        help="latency runs: SO_RCVLOWAT of the subscribers that are not timed (0: they read "
        "every message at once too)",
    )
    parser.add_argument(
        "--idle-subscribers", type=int, default=10000, help="subscribers in the memory workload"
    )
    parser.add_argument(
        "--memory-warmup",
        type=int,
        default=10,
        help="subscribers (on another channel) connected before the memory baseline is read",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds between all subscribers confirmed and the first publish (or RSS reading)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="seconds for the subscribers to be connected and reported by the server",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a throughput run may take (a latency run: --duration plus this)",
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=10.0,
        help="seconds to wait for the last deliveries after the publisher is done",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for CPUs 0 and 1 to be idle "
        "(on a shared machine); 0: do not wait",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=10.0,
        help="percent of a CPU that other processes may use for the machine to count as idle",
    )
    parser.add_argument(
        "--hub-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `backchannel serve` (repeat for several)",
    )
    parser.add_argument(
        "--tmp-dir",
        default=tempfile.gettempdir(),
        help="folder for the servers' temporary folders",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--publisher-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publisher_child:
        return args
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.workload_list) - set(ALL_WORKLOADS)
    if unknown or not args.workload_list:
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from {ALL_WORKLOADS}")
    if set(args.server_list) - set(ALL_SERVERS) or not args.server_list:
        parser.error(f"--servers: choose from {ALL_SERVERS}")
    for name in ("subscribers", "messages", "latency_subscribers", "idle_subscribers", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    try:
        payload(10**7, time.time_ns(), args.message_bytes)
    except BenchError as exc:
        parser.error(str(exc))
    return args


def raise_file_limit(needed: int) -> None:
    """Let this process and the servers (which inherit the limit) hold ``needed`` sockets:
    raise the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > hard:
        raise BenchError(f"about {needed} file descriptors are needed; the hard limit is {hard}")
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.publisher_child:
        return publisher_child(args.publisher_child)
    handle_stop_signals()
    require_tool("taskset")
    if "nchan" in args.server_list:
        require_tool("nginx")
        find_nchan_module()
    import uvloop

    most = max(args.subscribers, args.latency_subscribers, args.idle_subscribers)
    raise_file_limit(most + args.memory_warmup + FD_HEADROOM)
    os.sched_setaffinity(0, {CLIENT_CPU})
    results: list[Result] = []
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for workload in args.workload_list:
            for number in range(1, args.repeat + 1):
                for server_key in args.server_list:
                    result = run_case(runner, server_key, workload, args)
                    result.round = number
                    results.append(result)
    print(
        f"\nbackchannel (memory store) vs Nchan, servers on CPU {SERVER_CPU}, load generator "
        f"(uvloop, hand-written HTTP/1.1 and WebSocket) on CPU {CLIENT_CPU}\n"
    )
    print(report(results, args))
    if args.json:
        document = {
            "benchmark": "push_vs_nchan",
            "machine": machine(),
            "versions": versions(),
            "settings": {
                key: value
                for key, value in vars(args).items()
                if key not in ("publisher_child", "json")
            }
            | {"server_cpu": SERVER_CPU, "client_cpu": CLIENT_CPU},
            "results": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    run_main(main, "push_vs_nchan")
