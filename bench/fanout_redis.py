"""Fan-out of 2 hub nodes on Redis against 1 hub node on SQLite, same workload, same run.

Two set-ups, run one after the other (alternating with ``--repeat``):

``sqlite``
    One ``backchannel serve`` on its default SQLite store, pinned to ``--node-cpus``' first CPU.
    All S subscribers (``--subscribers``, 1000) connect to it.
``redis``
    One ``redis-server`` (no persistence, pinned to ``--redis-cpu``) and two hub nodes on it
    (``--store redis://…``), pinned to ``--node-cpus`` (node A on the first, node B on the
    second). Half the subscribers connect to node A, half to node B.

In both, one publisher (a separate process, see ``push_vs_nchan.py``) sends M messages
(``--messages``, 1000) of ``--message-bytes`` (100) JSON bytes to node A, over sequential POSTs
on one keep-alive connection, at ``--rate`` messages per second (0, the default: as fast as the
acknowledgements come). Every subscriber is an SSE connection of ``push_vs_nchan.py``'s load
generator (uvloop, hand-written HTTP/1.1), pinned with this script to ``--client-cpu``.

Reported per set-up: deliveries per second (S x M over the time from the first publish to the
last delivery), deliveries per CPU-second of the server processes (hub nodes, and redis-server
for the redis set-up), and publish-to-delivery latency p50 / p99 of the timed subscribers
(``--latency-probes``, 100, spread evenly; in the redis set-up only subscribers of node B are
timed, so every timed delivery crossed from node A through Redis to node B). The publisher
stamps each message with ``time.time_ns()`` just before writing its request.

On a 2-core machine the hub nodes, Redis and the load generator share the CPUs: the table
shows how busy each CPU was, and the server CPU-seconds, so that a reader can tell how much of a
difference is the work and how much is contention. Every delivery is checked: each subscriber
must receive every message once, in order.

Run ``python bench/fanout_redis.py --help`` for the options. Exits with status 1 when a check
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hubproc import (
    BenchError,
    HubProcess,
    handle_stop_signals,
    machine,
    markdown_table,
    percentile,
    process_cpu_seconds,
    require_tool,
    stop_process,
)
from push_vs_nchan import (
    HubServer,
    Publisher,
    Run,
    cpu_busy_pct,
    cpu_ticks,
    nonce,
    open_subscribers,
    raise_file_limit,
    wait_delivered,
    wait_subscribed,
)

FD_HEADROOM = 256
REDIS_START_TIMEOUT = 15.0


class Node(HubServer):
    """A hub process pinned to ``cpu``, on the store ``store_args`` name."""

    def __init__(self, *, store_args: list[str], cpu: int, label: str) -> None:
        self.label = label  # type: ignore[misc]
        self.hub = HubProcess(
            extra_args=["--log-level", "warning", "--no-tcp", *store_args], cpu=cpu
        )


@contextlib.contextmanager
def redis_server(cpu: int) -> Iterator[tuple[str, int]]:
    """A fresh ``redis-server`` on a free port, without persistence; yields its URL and pid."""
    executable = require_tool("redis-server")
    with tempfile.TemporaryDirectory(prefix="backchannel-bench-redis-") as folder:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            "taskset", "-c", str(cpu), executable, "--port", str(port), "--bind", "127.0.0.1",
            "--dir", folder, "--save", "", "--appendonly", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            deadline = time.monotonic() + REDIS_START_TIMEOUT
            while True:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1) as sock,
                ):
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("redis-server did not start")
                time.sleep(0.05)
            # taskset execs redis-server: the pid is the server's.
            yield f"redis://127.0.0.1:{port}/0?prefix=bench", proc.pid
        finally:
            stop_process(proc)


@dataclass
class Result:
    setup: str
    round: int
    metrics: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


async def measure(
    setup: str, nodes: list[Node], extra_pids: list[int], args: argparse.Namespace
) -> Result:
    result = Result(setup, 0)
    channel = f"bench-fanout-{nonce()}"
    count = args.messages
    run = Run(count, record_latency=True)
    shares = [args.subscribers // len(nodes)] * len(nodes)
    shares[0] += args.subscribers - sum(shares)
    publisher: Publisher | None = None
    try:
        for index, (node, share) in enumerate(zip(nodes, shares, strict=True)):
            # Timed subscribers only on the last node: with two nodes, every timed delivery
            # crossed from the publisher's node A through Redis to node B.
            timed = args.latency_probes if index == len(nodes) - 1 else 0
            await open_subscribers(node, channel, "sse", share, run, timed=timed)
        for node, share in zip(nodes, shares, strict=True):
            await wait_subscribed(node, channel, "sse", run, share, args.connect_timeout)
        publisher = await Publisher.start(
            nodes[0], channel, count=count, rate=args.rate, size=args.message_bytes
        )
        pids = [pid for node in nodes for pid in node.pids()] + extra_pids
        cpu_before = sum(process_cpu_seconds(pid) for pid in pids)
        ticks = cpu_ticks()
        started = time.perf_counter()
        publisher.go()
        await wait_delivered(run, publisher, args.drain, args.timeout)
        ended = run.completed_at or time.perf_counter()
        server_cpu = sum(process_cpu_seconds(pid) for pid in pids) - cpu_before
        busy = cpu_busy_pct(ticks, cpu_ticks())
        assert publisher.outcome is not None
        async with asyncio.timeout(args.drain + 5):
            published = await asyncio.shield(publisher.outcome)
    finally:
        run.close()
        if publisher is not None:
            await publisher.stop()
    for node in nodes:
        result.problems += [f"{node.label}: {line}" for line in node.problems()[:3]]
    if published["acknowledged"] != count:
        result.problems.append(f"{count - published['acknowledged']} publishes not acknowledged")
    short = [s for s in run.subscribers if s.received != count]
    if short or len(run.subscribers) != args.subscribers:
        result.problems.append(f"{len(short)} subscribers did not receive exactly {count}")
    disorder = sum(s.out_of_order + s.unparsed for s in run.subscribers)
    if disorder:
        result.problems.append(f"{disorder} deliveries out of order, duplicated or unparsed")
    failed = [s.problem for s in run.subscribers if s.problem]
    if failed:
        result.problems.append(f"{len(failed)} subscribers failed, first: {failed[0]}")
    wall = ended - started
    latencies = sorted(run.latencies or [])
    result.metrics = {
        "nodes": len(nodes),
        "subscribers": args.subscribers,
        "messages": count,
        "deliveries": run.received,
        "wall_s": wall,
        "deliveries_per_s": run.received / wall if wall else None,
        "publishes_per_s": count / published["elapsed_s"] if published["elapsed_s"] else None,
        "server_cpu_s": server_cpu,
        "deliveries_per_server_cpu_s": run.received / server_cpu if server_cpu else None,
        "latency_p50_ms": percentile(latencies, 50) / 1e6 if latencies else None,
        "latency_p99_ms": percentile(latencies, 99) / 1e6 if latencies else None,
        "timed_deliveries": len(latencies),
        "cpu_busy_pct": busy,
    }
    return result


async def run_setup(setup: str, args: argparse.Namespace) -> Result:
    cpus = args.node_cpu_list
    with contextlib.ExitStack() as stack:
        extra: list[int] = []
        if setup == "sqlite":
            nodes = [Node(store_args=[], cpu=cpus[0], label="sqlite")]
        else:
            url, redis_pid = stack.enter_context(redis_server(args.redis_cpu))
            nodes = [
                Node(store_args=["--store", url], cpu=cpus[i % len(cpus)], label=f"node-{name}")
                for i, name in enumerate("ab")
            ]
            extra = [redis_pid]
        for node in nodes:
            stack.enter_context(node)
        return await measure(setup, nodes, extra, args)


def report(results: list[Result]) -> str:
    rows = []
    for setup in ("sqlite", "redis"):
        runs = [r for r in results if r.setup == setup]
        if not runs:
            continue

        def median(key: str, runs: list[Result] = runs) -> float:
            values = [r.metrics[key] for r in runs if r.metrics.get(key) is not None]
            return statistics.median(values) if values else float("nan")

        busy = runs[-1].metrics["cpu_busy_pct"]
        rows.append(
            [
                "1 node, SQLite" if setup == "sqlite" else "2 nodes, Redis",
                f"{median('deliveries_per_s'):,.0f}",
                f"{median('deliveries_per_server_cpu_s'):,.0f}",
                f"{median('publishes_per_s'):,.0f}",
                f"{median('latency_p50_ms'):.1f}",
                f"{median('latency_p99_ms'):.1f}",
                " / ".join(f"{busy.get(cpu, 0):.0f}%" for cpu in sorted(busy)),
                "ok" if all(not r.problems for r in runs) else "FAILED",
            ]
        )
    headers = [
        "set-up",
        "deliveries/s",
        "deliveries / server CPU-s",
        "publishes/s",
        "p50 ms",
        "p99 ms",
        "CPUs busy",
        "checks",
    ]
    return markdown_table(headers, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--message-bytes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: as fast as acked")
    parser.add_argument("--latency-probes", type=int, default=100)
    parser.add_argument("--setups", default="sqlite,redis")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--node-cpus", default="0,1", help="CPUs of node A and node B")
    parser.add_argument("--redis-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    args.node_cpu_list = [int(c) for c in args.node_cpus.split(",")]
    args.setup_list = [s for s in args.setups.split(",") if s]
    if set(args.setup_list) - {"sqlite", "redis"}:
        parser.error("--setups takes sqlite and redis")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_stop_signals()
    require_tool("taskset")
    import uvloop

    raise_file_limit(args.subscribers + FD_HEADROOM)
    os.sched_setaffinity(0, {args.client_cpu})
    results: list[Result] = []
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for number in range(1, args.repeat + 1):
            for setup in args.setup_list:
                result = runner.run(run_setup(setup, args))
                result.round = number
                results.append(result)
                for problem in result.problems:
                    print(f"{setup} round {number}: {problem}", file=sys.stderr)
    print(
        f"\nFan-out, {args.subscribers} SSE subscribers x {args.messages} messages of "
        f"{args.message_bytes} bytes; nodes on CPUs {args.node_cpus}, redis-server on CPU "
        f"{args.redis_cpu}, load generator on CPU {args.client_cpu}. Latency: publish on node A "
        "to delivery (on node B for Redis).\n"
    )
    print(report(results))
    if args.json:
        document = {
            "benchmark": "fanout_redis",
            "machine": machine(),
            "settings": vars(args),
            "results": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
