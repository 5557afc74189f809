"""Slow consumer: do the subscribers that read keep their throughput while one stops reading?

One hub (``backchannel serve``, SQLite in a fresh temporary folder unless ``--store`` says
otherwise, TCP on) pinned to CPU 0; this script, the
load generator, on CPU 1 (see ``push_vs_nchan.py``, whose subscribers and publisher it uses).
Each round has two phases, on fresh channels, in the same hub process:

``without``
    N subscribers (``--subscribers``) of one transport (``--transport``: sse, ws or tcp) on a
    channel; once the hub reports them all, one publisher (a child process, sequential POSTs
    on one keep-alive connection) sends M messages (``--messages``) of ``--message-bytes``
    bytes as fast as the hub acknowledges them. The clock runs from the first publish to the
    last delivery.
``with``
    The same, plus one stalled subscriber of the same transport, connected first: a raw socket
    with a 4 KiB receive buffer that sends its request and never reads. The hub should cut it
    (``--max-outbound-bytes``, see docs/reliability.md) and go on at full speed for the others.

Reported, as medians over ``--repeat`` rounds: deliveries per wall second to the reading
subscribers and per server CPU-second, and the ratio with / without (1.0: the stalled
subscriber cost nothing); whether the stalled subscriber was cut in every round; the hub's
resident memory after each phase and its peak (``VmHWM``) at the end.

Checks (exit status 1): every reading subscriber received every message, in order, once;
every publish was acknowledged. A stalled subscriber that was never cut is a warning: publish
more than ``max_outbound_bytes`` plus the kernel's socket buffers (about 4 MiB on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from base64 import b64encode
from pathlib import Path
from typing import Any

from hubproc import (
    BenchError,
    handle_stop_signals,
    machine,
    markdown_table,
    require_tool,
    run_main,
)
from push_vs_nchan import (
    CLIENT_CPU,
    FD_HEADROOM,
    SERVER_CPU,
    HubServer,
    Publisher,
    Result,
    Run,
    judge_push,
    nonce,
    open_subscribers,
    payload,
    quiet_gc,
    raise_file_limit,
    subscriber_count,
    wait_delivered,
)

TRANSPORTS = ("sse", "ws", "tcp")
STALLED_RECEIVE_BUFFER = 4096


def open_stalled(server: HubServer, channel: str, transport: str) -> socket.socket:
    """A subscriber that sends its request and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RECEIVE_BUFFER)
    if transport == "tcp":
        from backchannel.wire import frames

        sock.connect((server.host, server.tcp_port))
        codec = frames.Connection(frames.Role.CLIENT)
        sock.sendall(codec.send(frames.Hello(versions=(1,))))
        sock.sendall(frames.encode(frames.Subscribe(request=1, channel=channel, after=None)))
        return sock
    sock.connect((server.host, server.port))
    path = server.subscribe_path(channel, transport)
    if transport == "sse":
        request = f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\nAccept: text/event-stream\r\n\r\n"
    else:
        key = b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    sock.sendall(request.encode())
    return sock


async def wait_counted(
    server: HubServer, channel: str, transport: str, want: int, limit: float, run: Run | None
) -> bool:
    """Wait until the hub reports ``want`` subscribers (and, with ``run``, every one of its
    subscribers has been answered); False after ``limit`` seconds."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if run is not None:
            failed = [s.problem for s in run.subscribers if s.problem]
            if failed:
                raise BenchError(f"{len(failed)} subscribers failed, first: {failed[0]}")
        ready = run is None or run.ready >= len(run.subscribers)
        if ready and await subscriber_count(server, channel, transport) == want:
            return True
        await asyncio.sleep(0.05)
    return False


async def phase(server: HubServer, args: argparse.Namespace, stalled: bool, result: Result) -> None:
    channel = f"bench-slow-{nonce()}"
    run = Run(args.messages, record_latency=False)
    stall: socket.socket | None = None
    publisher: Publisher | None = None
    try:
        if stalled:
            stall = await asyncio.to_thread(open_stalled, server, channel, args.transport)
        await open_subscribers(server, channel, args.transport, args.subscribers, run)
        want = args.subscribers + (1 if stalled else 0)
        if not await wait_counted(server, channel, args.transport, want, args.connect_timeout, run):
            raise BenchError(f"the hub never reported {want} subscribers")
        publisher = await Publisher.start(
            server, channel, count=args.messages, rate=0.0, size=args.message_bytes
        )
        with quiet_gc():
            cpu = server.cpu_seconds()
            started = time.perf_counter()
            publisher.go()
            await wait_delivered(run, publisher, args.drain, args.timeout)
            wall = (run.completed_at or time.perf_counter()) - started
            cpu = server.cpu_seconds() - cpu
        assert publisher.outcome is not None
        async with asyncio.timeout(args.drain):
            published = await asyncio.shield(publisher.outcome)
        cut = None
        if stalled:
            # The reading subscribers are done: the hub must have let the stalled one go.
            cut = await wait_counted(
                server, channel, args.transport, args.subscribers, args.drain, None
            )
        rss = server.rss_kib()
    finally:
        run.close()
        if publisher is not None:
            await publisher.stop()
        if stall is not None:
            stall.close()
    judge_push(run, published, args.subscribers, args.messages, result)
    if cut is False:
        result.warnings.append(
            "the stalled subscriber was not cut: publish more (--messages x --message-bytes) "
            "than max_outbound_bytes plus the kernel's socket buffers"
        )
    result.metrics = {
        "deliveries": run.received,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "deliveries_per_s": run.received / wall if wall else None,
        "deliveries_per_server_cpu_s": run.received / cpu if cpu else None,
        "publishes_per_s": args.messages / published["elapsed_s"],
        "stalled_cut": None if cut is None else int(cut),
        "hub_rss_mib": rss / 1024,
    }


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise BenchError(f"no VmHWM for process {pid}")


def median(results: list[Result], key: str) -> float | None:
    values = [float(v) for r in results if (v := r.metrics.get(key)) is not None]
    return statistics.median(values) if values else None


def report(results: list[Result], args: argparse.Namespace, peak_kib: int) -> str:
    without = [r for r in results if r.workload == "without"]
    with_ = [r for r in results if r.workload == "with"]
    rows = []
    for label, key, fmt in (
        ("**deliveries per wall second**", "deliveries_per_s", "{:,.0f}"),
        ("deliveries per server CPU-second", "deliveries_per_server_cpu_s", "{:,.0f}"),
        ("wall s (first publish to last delivery)", "wall_s", "{:.2f}"),
        ("publishes per second (one publisher)", "publishes_per_s", "{:,.0f}"),
        ("hub RSS MiB after the phase", "hub_rss_mib", "{:.1f}"),
    ):
        a, b = median(without, key), median(with_, key)
        ratio = f"{b / a:.2f}" if a and b is not None else "-"
        rows.append(
            [
                label,
                "-" if a is None else fmt.format(a),
                "-" if b is None else fmt.format(b),
                ratio,
            ]
        )
    cuts = [r.metrics.get("stalled_cut") for r in with_]
    rows.append(["stalled subscriber cut", "", f"{sum(c or 0 for c in cuts)} of {len(cuts)}", ""])
    rows.append(
        [
            "check",
            "ok" if all(r.ok for r in without) else "FAILED",
            "ok" if all(r.ok for r in with_) else "FAILED",
            "",
        ]
    )
    title = (
        f"### Slow consumer, {args.transport}: {args.subscribers} reading subscribers, "
        f"{args.messages} messages of {args.message_bytes} bytes, median of {args.repeat} "
        "round(s)\n\n"
    )
    table = markdown_table(["", "without", "with one stalled", "ratio with / without"], rows)
    notes = [f"\nhub peak RSS (VmHWM) at the end: {peak_kib / 1024:.1f} MiB"]
    for r in results:
        notes += [f"- round {r.round} {r.workload}: {p}" for p in r.problems + r.warnings]
    return title + table + "\n" + "\n".join(notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of N reading subscribers with and without one stalled "
        "subscriber, in the same run; prints a markdown table with the ratio, exits 1 if a "
        "reading subscriber lost, repeated or reordered a message.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="sse")
    parser.add_argument("--subscribers", type=int, default=100, help="reading subscribers")
    parser.add_argument("--messages", type=int, default=5000, help="messages per phase")
    parser.add_argument("--message-bytes", type=int, default=2000, help="size of each message")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each: without, with)")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a phase may take")
    parser.add_argument(
        "--drain",
        type=float,
        default=15.0,
        help="seconds to wait for the last deliveries, and for the cut, after the publisher",
    )
    parser.add_argument(
        "--hub-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `backchannel serve`, e.g. --hub-arg=--max-outbound-bytes=65536",
    )
    parser.add_argument(
        "--store",
        default="",
        help="the hub's --store (empty: SQLite; memory:// keeps every message in the hub's "
        "memory, which then dominates its RSS)",
    )
    parser.add_argument("--tmp-dir", default=tempfile.gettempdir())
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.subscribers, args.messages, args.repeat) < 1:
        parser.error("--subscribers, --messages and --repeat must be at least 1")
    try:
        payload(10**7, time.time_ns(), args.message_bytes)
    except BenchError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_stop_signals()
    require_tool("taskset")
    import uvloop

    raise_file_limit(args.subscribers + FD_HEADROOM)
    os.sched_setaffinity(0, {CLIENT_CPU})
    results: list[Result] = []
    server = HubServer(extra_args=args.hub_arg, tmp_root=args.tmp_dir, store=args.store, tcp=True)
    with server, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for number in range(1, args.repeat + 1):
            for name in ("without", "with"):
                result = Result(workload=name, server=server.label, round=number)
                print(f"round {number}: {name}...", file=sys.stderr, flush=True)
                try:
                    runner.run(phase(server, args, name == "with", result))
                    server.check_alive()
                except (BenchError, OSError, TimeoutError) as exc:
                    result.problems.insert(0, f"{type(exc).__name__}: {exc}")
                result.ok = not result.problems
                results.append(result)
        peak = peak_rss_kib(server.hub.pid)
        logged = server.problems()
    if logged:
        results[-1].problems.append(f"{len(logged)} error lines in the hub's log: {logged[0]}")
        results[-1].ok = False
    print(
        f"\nbackchannel (store: {args.store or 'SQLite'}), hub on CPU {SERVER_CPU}, load "
        f"generator on CPU {CLIENT_CPU}\n"
    )
    print(report(results, args, peak))
    if args.json:
        document: dict[str, Any] = {
            "benchmark": "slow_consumer",
            "machine": machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "hub_peak_rss_kib": peak,
            "results": [vars(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    run_main(main, "slow_consumer")
