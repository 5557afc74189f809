"""Long-poll release: how fast one publish answers N long polls waiting on one channel.

The script starts a hub (SQLite in a temporary folder, default settings) pinned to CPU 0, pins
itself to CPU 1, and opens N (default 1000) HTTP/1.1 connections to the hub. Each sends
``GET /v1/channels/{channel}/messages?after=CURSOR&wait=SECONDS``. Once the hub reports all N
waiting (``GET /v1/channels/{channel}`` answers ``"subscribers": {"longpoll": N}``) and a short
settle time has passed (``--settle``: the hub counts a poll before the poll's first read of
the channel has finished), the script publishes ONE JSON message on a fresh connection and
measures, for every poll, the time from the moment the publish request is written to the
socket to the moment that poll's whole response has been read. It then checks that every poll
answered 200 with exactly that message (same id, same data) and nothing else.

Reported: whether all polls were released, how many, and the min/p50/p99/max release latency;
also the publish's own acknowledgement time, how long the N polls took to be all waiting, and
the CPU time this client spent between the publish and the last response (to show it was not
the bottleneck).
With ``--rounds R`` the polls are sent again on the same connections (``after=`` the last id)
and the measure repeats, R times in all.

The client is hand-written HTTP/1.1 over ``asyncio.Protocol`` (on uvloop when installed): one
``data_received`` call per read, a timestamp and a small header parse, no per-request objects
beyond the response. That keeps it far cheaper per response than the hub, so the hub, not the
client, sets the numbers. Garbage collection is off while a round is measured.

Run ``python bench/longpoll_release.py --help`` for the options. The script exits with status 1
when a poll was not released with the published message.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from hubproc import (
    BenchError,
    HubProcess,
    handle_stop_signals,
    machine,
    markdown_table,
    percentile,
    require_tool,
    run_main,
)

HUB_CPU = 0
CLIENT_CPU = 1
CHANNEL = "bench-longpoll"
CONNECT_CONCURRENCY = 256
FD_HEADROOM = 64
CONTROL_TIMEOUT = 10.0  # seconds for a channel-info request
HEADER_END = b"\r\n\r\n"


# -- a minimal HTTP/1.1 client ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HTTPResponse:
    status: int
    body: bytes
    received_at: float  # time.perf_counter() when the last byte of the response was read

    def json(self) -> Any:
        return json.loads(self.body)


class HTTPConnection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; responses must have a
    ``Content-Length`` (the hub always sends one)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: asyncio.Future[HTTPResponse] | None = None
        self.unexpected_bytes = 0  # bytes received with no request waiting for them

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._buffer += data
        if self._pending is None or self._pending.done():
            self.unexpected_bytes += len(self._buffer)
            self._buffer.clear()
            return
        end = self._buffer.find(HEADER_END)
        if end < 0:
            return
        try:
            status, length = _parse_head(bytes(self._buffer[:end]))
        except ValueError as exc:
            self._pending.set_exception(exc)
            return
        total = end + len(HEADER_END) + length
        if len(self._buffer) < total:
            return
        body = bytes(self._buffer[end + len(HEADER_END) : total])
        del self._buffer[:total]
        self.unexpected_bytes += len(self._buffer)
        self._buffer.clear()
        self._pending.set_result(HTTPResponse(status, body, now))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(
                ConnectionError(f"the hub closed the connection: {exc or 'EOF'}")
            )

    def send(self, request: bytes) -> asyncio.Future[HTTPResponse]:
        """Write ``request`` and return the future of its response."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection is closed")
        if self._pending is not None and not self._pending.done():
            raise RuntimeError("one request at a time on a connection")
        self._pending = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._pending

    def close(self) -> None:
        """Close the connection; a response still awaited is cancelled, not failed."""
        pending = self._pending
        if pending is not None:
            if not pending.done():
                pending.cancel()
            elif not pending.cancelled():
                pending.exception()  # mark it seen: nobody is left to read it
        if self.transport is not None:
            self.transport.close()


def _parse_head(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(parts[1])
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not supported by this client")
    if length is None:
        raise ValueError("the response has no Content-Length")
    return status, length


def get_request(path: str, host: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def post_json_request(path: str, host: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def connect(host: str, port: int) -> HTTPConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HTTPConnection, host, port)
    return protocol


async def request_once(host: str, port: int, request: bytes) -> HTTPResponse:
    """One request on a fresh connection, closed afterwards."""
    async with asyncio.timeout(CONTROL_TIMEOUT):
        connection = await connect(host, port)
        try:
            return await connection.send(request)
        finally:
            connection.close()


# -- the benchmark ------------------------------------------------------------------------------


@dataclass
class RoundResult:
    polls: int
    round: int
    all_released: bool
    released: int
    wrong: int
    not_answered: int
    latency_min_ms: float | None  # None when no poll was released
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    publish_ack_ms: float
    setup_s: float
    client_cpu_ms: float
    problems: list[str]


class Bench:
    def __init__(
        self, host: str, port: int, polls: int, *, wait: float, timeout: float, settle: float
    ) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}"
        self.polls = polls
        self.wait = wait
        self.timeout = timeout
        self.settle = settle
        self.connections: list[HTTPConnection] = []

    async def open_connections(self) -> None:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one() -> HTTPConnection:
            async with gate:
                return await connect(self.host, self.port)

        self.connections = list(await asyncio.gather(*(one() for _ in range(self.polls))))

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

    async def waiting(self) -> int:
        response = await request_once(
            self.host, self.port, get_request(f"/v1/channels/{CHANNEL}", self.authority)
        )
        if response.status != 200:
            raise BenchError(f"channel info answered {response.status}: {response.body[:300]!r}")
        subscribers: dict[str, int] = response.json()["subscribers"]
        return subscribers.get("longpoll", 0)

    async def measure_round(self, number: int, after: str) -> tuple[RoundResult, str]:
        path = f"/v1/channels/{CHANNEL}/messages?after={after}&wait={self.wait:g}"
        request = get_request(path, self.authority)
        started = time.perf_counter()
        futures = [connection.send(request) for connection in self.connections]
        await self._until_all_waiting(futures)
        setup_s = time.perf_counter() - started
        # The hub counts a poll as waiting before the poll's first read of the channel is done;
        # let those reads finish so that the publish meets an idle hub.
        await asyncio.sleep(self.settle)

        payload = {"bench": "longpoll-release", "round": number, "nonce": uuid.uuid4().hex}
        body = json.dumps(payload, separators=(",", ":")).encode()
        publisher = await connect(self.host, self.port)
        gc.disable()
        try:
            cpu_at = time.process_time()
            sent_at = time.perf_counter()
            published_future = publisher.send(
                post_json_request(f"/v1/channels/{CHANNEL}/messages", self.authority, body)
            )
            done, _ = await asyncio.wait([*futures, published_future], timeout=self.timeout)
            client_cpu_ms = (time.process_time() - cpu_at) * 1000
        finally:
            gc.enable()
            publisher.close()
        if published_future not in done:
            raise BenchError(f"the publish got no answer in {self.timeout:g} s")
        published = published_future.result()
        if published.status != 201:
            raise BenchError(f"the publish answered {published.status}: {published.body[:300]!r}")
        message_id: str = published.json()["id"]
        verdict = self._check(futures, done, sent_at, message_id, payload)
        latencies = verdict.latencies_ms
        result = RoundResult(
            polls=self.polls,
            round=number,
            all_released=len(latencies) == self.polls,
            released=len(latencies),
            wrong=verdict.wrong,
            not_answered=verdict.not_answered,
            latency_min_ms=_rounded(latencies[0] if latencies else None),
            latency_p50_ms=_rounded(percentile(latencies, 50) if latencies else None),
            latency_p99_ms=_rounded(percentile(latencies, 99) if latencies else None),
            latency_max_ms=_rounded(latencies[-1] if latencies else None),
            publish_ack_ms=round((published.received_at - sent_at) * 1000, 3),
            setup_s=round(setup_s, 3),
            client_cpu_ms=round(client_cpu_ms, 1),
            problems=verdict.problems,
        )
        return result, message_id

    async def _until_all_waiting(self, futures: list[asyncio.Future[HTTPResponse]]) -> None:
        deadline = time.perf_counter() + self.timeout + self.polls / 200
        while True:
            answered = [f for f in futures if f.done()]
            if answered:
                first = answered[0]
                detail = (
                    f"{first.result().status} {first.result().body[:300]!r}"
                    if first.exception() is None
                    else repr(first.exception())
                )
                raise BenchError(
                    f"{len(answered)} polls answered before the publish, first: {detail}"
                )
            count = await self.waiting()
            if count == self.polls:
                return
            if count > self.polls:
                raise BenchError(f"the hub reports {count} long polls, more than the {self.polls}")
            if time.perf_counter() > deadline:
                raise BenchError(f"only {count} of {self.polls} polls are waiting in the hub")
            await asyncio.sleep(0.05)

    def _check(
        self,
        futures: list[asyncio.Future[HTTPResponse]],
        done: set[asyncio.Future[HTTPResponse]],
        sent_at: float,
        message_id: str,
        payload: dict[str, Any],
    ) -> Verdict:
        verdict = Verdict()
        problems: set[str] = set()
        for connection, future in zip(self.connections, futures, strict=True):
            if future not in done:
                verdict.not_answered += 1
                continue
            error = future.exception()
            problem = repr(error) if error is not None else None
            if problem is None:
                response = future.result()
                problem = _wrong_answer(response, message_id, payload)
            if problem is None and connection.unexpected_bytes:
                problem = f"{connection.unexpected_bytes} bytes after the response"
            if problem is not None:
                verdict.wrong += 1
                problems.add(problem)
                continue
            verdict.latencies_ms.append((response.received_at - sent_at) * 1000)
        verdict.latencies_ms.sort()
        if verdict.not_answered:
            problems.add(f"{verdict.not_answered} polls not answered within {self.timeout:g} s")
        verdict.problems = sorted(problems)[:10]
        return verdict


@dataclass
class Verdict:
    """What the polls of one round answered: the latencies of the right answers, and the rest."""

    latencies_ms: list[float] = field(default_factory=list)
    wrong: int = 0
    not_answered: int = 0
    problems: list[str] = field(default_factory=list)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _wrong_answer(response: HTTPResponse, message_id: str, payload: dict[str, Any]) -> str | None:
    if response.status != 200:
        return f"status {response.status}: {response.body[:200]!r}"
    document = response.json()
    messages = document.get("messages")
    if not isinstance(messages, list) or len(messages) != 1:
        count = len(messages) if isinstance(messages, list) else "no"
        return f"{count} messages instead of 1"
    message = messages[0]
    if message.get("id") != message_id:
        return f"message {message.get('id')} instead of {message_id}"
    if message.get("data") != payload:
        return f"data {message.get('data')!r} instead of {payload!r}"
    if document.get("next_after") != message_id:
        return f"next_after {document.get('next_after')} instead of {message_id}"
    return None


async def run_hub_rounds(
    hub: HubProcess, polls: int, args: argparse.Namespace
) -> list[RoundResult]:
    host, port = hub.url.removeprefix("http://").rsplit(":", 1)
    bench = Bench(host, int(port), polls, wait=args.wait, timeout=args.timeout, settle=args.settle)
    try:
        await bench.open_connections()
        results = []
        after = "0"
        for number in range(1, args.rounds + 1):
            result, after = await bench.measure_round(number, after)
            results.append(result)
        return results
    finally:
        bench.close()


def raise_file_limit(polls: int) -> None:
    """Let this process (and the hub, which inherits the limit) hold ``polls`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = polls + FD_HEADROOM
    if needed > hard:
        raise BenchError(
            f"{polls} polls need about {needed} file descriptors; the hard limit is {hard}"
        )
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def pin_self(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_async(coroutine: Any) -> Any:
    if event_loop_name() == "uvloop":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def table(results: list[RoundResult]) -> str:
    headers = [
        "polls",
        "round",
        "all released",
        "released",
        "min ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "publish 201 ms",
        "all waiting after s",
        "client CPU ms",
    ]
    rows = [
        [
            r.polls,
            r.round,
            "yes" if r.all_released else "NO",
            f"{r.released}/{r.polls}",
            _cell(r.latency_min_ms),
            _cell(r.latency_p50_ms),
            _cell(r.latency_p99_ms),
            _cell(r.latency_max_ms),
            f"{r.publish_ack_ms:.2f}",
            f"{r.setup_s:.2f}",
            f"{r.client_cpu_ms:.1f}",
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Release latency of N long polls on one channel after one publish, against "
        "a real hub pinned to CPU 0 (this client runs on CPU 1). Prints a markdown table; exits "
        "1 if a poll was not released with the published message.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--polls",
        default="1000",
        help="concurrent long polls; a comma-separated list runs each size on a fresh hub",
    )
    parser.add_argument("--rounds", type=int, default=1, help="publishes measured per hub")
    parser.add_argument(
        "--wait", type=float, default=60.0, help="wait= of each poll, in seconds (hub max: 60)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for all polls to be waiting, and then to be released",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds between the hub reporting all polls waiting and the publish",
    )
    parser.add_argument(
        "--tmp-dir",
        default=tempfile.gettempdir(),
        help="folder in which each hub gets a fresh temporary data dir",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        args.poll_sizes = [int(p) for p in args.polls.split(",") if p.strip()]
    except ValueError:
        parser.error("--polls takes whole numbers separated by commas")
    if not args.poll_sizes or min(args.poll_sizes) < 1 or args.rounds < 1:
        parser.error("--polls and --rounds must be at least 1")
    if args.timeout >= args.wait:
        parser.error("--timeout must be shorter than --wait, or polls would time out unreleased")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_stop_signals()
    require_tool("taskset")
    raise_file_limit(max(args.poll_sizes))
    pin_self(CLIENT_CPU)
    results: list[RoundResult] = []
    for polls in args.poll_sizes:
        print(f"running {polls} long polls, {args.rounds} round(s)...", file=sys.stderr)
        with HubProcess(cpu=HUB_CPU, tmp_root=args.tmp_dir) as hub:
            results.extend(run_async(run_hub_rounds(hub, polls, args)))
            hub.check_alive()
            for line in hub.logged_errors()[:5]:
                print(f"  the hub logged: {line[:300]}", file=sys.stderr)

    print(
        f"\nLong-poll release: hub (SQLite, default settings) on CPU {HUB_CPU}, "
        f"client ({event_loop_name()}, raw HTTP/1.1) on CPU {CLIENT_CPU}; latency from the "
        "publish's send to each poll's full response\n"
    )
    print(table(results))
    for r in results:
        for problem in r.problems:
            print(f"  {r.polls} polls, round {r.round}: {problem}")
    if args.json:
        document = {
            "benchmark": "longpoll_release",
            "machine": machine(),
            "settings": {
                "wait_s": args.wait,
                "timeout_s": args.timeout,
                "settle_s": args.settle,
                "rounds": args.rounds,
                "hub_cpu": HUB_CPU,
                "client_cpu": CLIENT_CPU,
                "client_loop": event_loop_name(),
            },
            "runs": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r.all_released for r in results) else 1


if __name__ == "__main__":
    run_main(main, "longpoll_release")
