"""Soak: 1,000 subscribers of mixed transports and 100 messages a second for 10 minutes.

One hub (``backchannel serve``, SQLite in a fresh temporary folder by default, TCP on) pinned
to CPU 0; this script, the load generator, on CPU 1, with the subscribers and the publisher of
``push_vs_nchan.py``:

- ``--subscribers`` (1000) on one channel, split evenly over ``--transports`` (``sse``, ``ws``
  and ``tcp``: server-sent events, the one-channel WebSocket and the binary TCP protocol).
  To keep the load generator's CPU low, each asks the kernel to wake it only once
  ``--batch-bytes`` (16 KiB) wait in its socket (``SO_RCVLOWAT``), and reads what is left at
  the end. The hub still writes every message to every subscriber as it is published.
- One publisher (a child process, sequential POSTs on one keep-alive connection) sends
  ``--rate`` (100) messages a second of ``--message-bytes`` (200) for ``--duration`` (600)
  seconds, on a fixed schedule.
- Every ``--sample-every`` (5) seconds the hub's resident memory (``VmRSS``), its CPU time and
  the deliveries so far are sampled.

Checks (exit status 1): every publish acknowledged, and every subscriber received every
message, in order, once (the payload carries a sequence number); no subscriber dropped; no
error in the hub's log. Reported: the hub's memory at the start (all subscribers connected,
before the first publish), its peak (the largest sample, and ``VmHWM``), at the end (every
message delivered), the slope over the second half of the run, and a table over time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
    raise_file_limit,
    subscriber_count,
    wait_delivered,
)

TRANSPORTS = ("sse", "ws", "tcp")
TABLE_ROWS = 20


@dataclass
class Sample:
    elapsed_s: float
    rss_mib: float
    hub_cpu_s: float
    deliveries: int
    subscribers: int


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise BenchError(f"no VmHWM for process {pid}")


def split(total: int, transports: list[str]) -> dict[str, int]:
    shares = {t: total // len(transports) for t in transports}
    for t in transports[: total % len(transports)]:
        shares[t] += 1
    return shares


async def connected(server: HubServer, channel: str, shares: dict[str, int]) -> int:
    return sum([await subscriber_count(server, channel, t) for t in shares])


async def wait_all_subscribed(
    server: HubServer, channel: str, shares: dict[str, int], run: Run, limit: float
) -> float:
    started = time.perf_counter()
    while True:
        failed = [s.problem for s in run.subscribers if s.problem]
        if failed:
            raise BenchError(f"{len(failed)} subscribers failed, first: {failed[0]}")
        if run.ready >= sum(shares.values()):
            counts = {t: await subscriber_count(server, channel, t) for t in shares}
            if counts == shares:
                return time.perf_counter() - started
        if time.perf_counter() - started > limit:
            raise BenchError(f"after {limit:g} s, {run.ready} subscribers were answered")
        await asyncio.sleep(0.1)


async def soak(server: HubServer, args: argparse.Namespace, result: Result) -> list[Sample]:
    channel = f"bench-soak-{nonce()}"
    count = round(args.rate * args.duration)
    shares = split(args.subscribers, args.transport_list)
    run = Run(count, record_latency=False)
    publisher: Publisher | None = None
    samples: list[Sample] = []
    try:
        for transport, share in shares.items():
            await open_subscribers(
                server, channel, transport, share, run, timed=0, batch_bytes=args.batch_bytes
            )
        setup_s = await wait_all_subscribed(server, channel, shares, run, args.connect_timeout)
        await asyncio.sleep(args.settle)
        publisher = await Publisher.start(
            server, channel, count=count, rate=args.rate, size=args.message_bytes
        )
        cpu_start = server.cpu_seconds()
        started = time.perf_counter()

        async def sample() -> None:
            samples.append(
                Sample(
                    elapsed_s=time.perf_counter() - started,
                    rss_mib=server.rss_kib() / 1024,
                    hub_cpu_s=server.cpu_seconds() - cpu_start,
                    deliveries=run.received,
                    subscribers=await connected(server, channel, shares),
                )
            )

        async def sampler() -> None:
            while True:
                await asyncio.sleep(args.sample_every)
                server.check_alive()
                await sample()
                print(
                    f"  {samples[-1].elapsed_s:6.0f} s  RSS {samples[-1].rss_mib:7.1f} MiB  "
                    f"{samples[-1].subscribers} subscribers",
                    file=sys.stderr,
                    flush=True,
                )

        await sample()  # the start: everyone connected, nothing published yet
        sampling = asyncio.create_task(sampler())
        try:
            publisher.go()
            await wait_delivered(run, publisher, args.drain, args.duration + args.timeout)
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        await sample()  # the end: every message delivered (or the drain ran out)
        assert publisher.outcome is not None
        async with asyncio.timeout(args.drain):
            published = await asyncio.shield(publisher.outcome)
    finally:
        run.close()
        if publisher is not None:
            await publisher.stop()
    judge_push(run, published, args.subscribers, count, result)
    if samples[-1].subscribers != args.subscribers:
        result.problems.append(
            f"the hub counted {samples[-1].subscribers} subscribers at the end, "
            f"not {args.subscribers}"
        )
    result.metrics = {
        "subscribers": args.subscribers,
        "messages": count,
        "deliveries_expected": count * args.subscribers,
        "deliveries": run.received,
        "publishes_late": published["late"],
        "publishes_per_s": count / published["elapsed_s"] if published["elapsed_s"] else 0,
        "subscribe_s": setup_s,
        "hub_cpu_pct": 100 * samples[-1].hub_cpu_s / samples[-1].elapsed_s,
    }
    return samples


def slope_mib_per_min(samples: list[Sample]) -> float | None:
    """Least-squares slope of RSS over the second half of the run, in MiB per minute."""
    half = [s for s in samples if s.elapsed_s >= samples[-1].elapsed_s / 2]
    if len(half) < 3:
        return None
    mean_t = sum(s.elapsed_s for s in half) / len(half)
    mean_m = sum(s.rss_mib for s in half) / len(half)
    var = sum((s.elapsed_s - mean_t) ** 2 for s in half)
    if not var:
        return None
    cov = sum((s.elapsed_s - mean_t) * (s.rss_mib - mean_m) for s in half)
    return 60 * cov / var


def report(result: Result, samples: list[Sample], peak_kib: int, args: argparse.Namespace) -> str:
    shares = split(args.subscribers, args.transport_list)
    mix = ", ".join(f"{n} {t}" for t, n in shares.items())
    metrics = result.metrics
    lines = [
        f"### Soak: {args.subscribers} subscribers ({mix}), {args.rate:g} messages/s of "
        f"{args.message_bytes} bytes for {args.duration:g} s, store "
        f"{args.store or 'SQLite (default)'}\n",
    ]
    if samples:
        start, end = samples[0], samples[-1]
        peak = max(samples, key=lambda s: s.rss_mib)
        slope = slope_mib_per_min(samples)
        rows = [
            [
                "deliveries",
                f"{metrics.get('deliveries', 0):,} of {metrics.get('deliveries_expected', 0):,}",
            ],
            ["**hub RSS at the start MiB**", f"{start.rss_mib:.1f}"],
            [
                "**hub RSS peak MiB** (largest sample, at s)",
                f"{peak.rss_mib:.1f} at {peak.elapsed_s:.0f}",
            ],
            ["hub peak RSS (VmHWM) MiB", f"{peak_kib / 1024:.1f}"],
            ["**hub RSS at the end MiB**", f"{end.rss_mib:.1f}"],
            [
                "RSS slope over the second half, MiB/min",
                "-" if slope is None else f"{slope:+.2f}",
            ],
            ["hub CPU % (of CPU 0)", f"{metrics.get('hub_cpu_pct', 0):.0f}%"],
            ["publishes per second (achieved)", f"{metrics.get('publishes_per_s', 0):.1f}"],
            ["publishes sent over 1 ms behind schedule", f"{metrics.get('publishes_late', 0):,}"],
            ["check", "ok" if result.ok else "FAILED"],
        ]
        lines.append(markdown_table(["", "value"], rows))
        step = max(1, len(samples) // TABLE_ROWS)
        shown = samples[::step]
        if shown[-1] is not samples[-1]:
            shown.append(samples[-1])
        lines.append("\nOver time (deliveries lag while subscribers read in batches):\n")
        lines.append(
            markdown_table(
                ["s", "hub RSS MiB", "hub CPU s", "deliveries", "subscribers"],
                [
                    [
                        f"{s.elapsed_s:.0f}",
                        f"{s.rss_mib:.1f}",
                        f"{s.hub_cpu_s:.1f}",
                        f"{s.deliveries:,}",
                        s.subscribers,
                    ]
                    for s in shown
                ],
            )
        )
    lines += [f"- {p}" for p in result.problems + result.warnings]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak: many subscribers of mixed transports and a steady publish rate for "
        "a long time; checks that nothing is lost and reports the hub's memory over time. "
        "Exits 1 if a check failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of publishing")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help=f"comma-separated, from {', '.join(TRANSPORTS)}; subscribers are split evenly",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--message-bytes", type=int, default=200)
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=16384,
        help="SO_RCVLOWAT of every subscriber (0: each reads every message as it comes)",
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--store", default="", help="the hub's --store (empty: SQLite in its temporary folder)"
    )
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds allowed beyond --duration"
    )
    parser.add_argument("--drain", type=float, default=30.0)
    parser.add_argument(
        "--hub-arg", action="append", default=[], metavar="ARG", help="extra `serve` argument"
    )
    parser.add_argument("--tmp-dir", default=tempfile.gettempdir())
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.transport_list = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not args.transport_list or set(args.transport_list) - set(TRANSPORTS):
        parser.error(f"--transports: choose from {', '.join(TRANSPORTS)}")
    if args.subscribers < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--subscribers, --rate and --duration must be positive")
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
    result = Result(workload="soak", server="backchannel")
    samples: list[Sample] = []
    peak = 0
    server = HubServer(extra_args=args.hub_arg, tmp_root=args.tmp_dir, store=args.store, tcp=True)
    with server, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            samples = runner.run(soak(server, args, result))
            server.check_alive()
        except (BenchError, OSError, TimeoutError) as exc:
            result.problems.insert(0, f"{type(exc).__name__}: {exc}")
        peak = peak_rss_kib(server.hub.pid)
        logged = server.problems()
        if logged:
            result.problems.append(f"{len(logged)} error lines in the hub's log: {logged[0]}")
    result.ok = not result.problems
    print(f"\nhub on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}\n")
    print(report(result, samples, peak, args))
    if args.json:
        document: dict[str, Any] = {
            "benchmark": "soak",
            "machine": machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "hub_peak_rss_kib": peak,
            "result": asdict(result),
            "samples": [asdict(s) for s in samples],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    run_main(main, "soak")
