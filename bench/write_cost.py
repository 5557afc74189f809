"""What one small write to a loopback subscriber costs the kernel, with and without Nagle.

This is the floor under any push server on this machine, the hub and Nchan alike: the fan-out
of one message to S subscribers is S writes, and on loopback the kernel does the receiving
side's work on the sending CPU too. The script measures it without any server in the way.

A reader process pinned to CPU 1 opens S connections to this process, pinned to CPU 0. Like the
load generator of ``push_vs_nchan.py``, every tenth connection reads each message as it comes
and the others set ``SO_RCVLOWAT`` (spread around ``--batch-bytes``) so they wake only once a
batch waits. This process then sends ``--rounds`` rounds of one ``--message-bytes`` message to
every connection, ``--rate`` rounds a second, with plain blocking ``send`` calls, and reports
its own user and system CPU time per write (``getrusage``), once with ``TCP_NODELAY`` (what
the hub, Go's net package and Node set) and once without (Linux's default, which nginx leaves
on Nchan's stream sockets).

With Nagle's algorithm a write to a socket that still has unacknowledged data only appends to
the socket's queue: no segment goes through the loopback device until the peer's ACK comes, and
that ACK (and the transmission it releases) is processed on the reader's CPU. A reader that
does not read for a while delays its ACK by up to ~40 ms, and everything written meanwhile
waits: cheap for the sender, late for the reader.

    python bench/write_cost.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import selectors
import signal
import socket
import time

from hubproc import BenchError, machine, markdown_table, percentile, run_main, spread_batch


def reader(port: int, count: int, batch_bytes: int, ready: int, stop: int) -> None:
    """The reading side (a forked child on CPU 1): connect, read, and time what the prompt
    readers get until ``stop`` becomes readable; then write their latencies' summary (JSON)
    to ``ready``."""
    os.sched_setaffinity(0, {1})
    selector = selectors.DefaultSelector()
    prompt: dict[int, bytes] = {}
    for index in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if index % 10 and batch_bytes:
            mark = spread_batch(batch_bytes, index)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
        else:
            prompt[sock.fileno()] = b""
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    selector.register(stop, selectors.EVENT_READ)
    os.write(ready, b"x")
    latencies: list[float] = []
    while True:
        for key, _ in selector.select():
            if key.fd == stop:
                latencies.sort()
                summary = {
                    "probe_deliveries": len(latencies),
                    "probe_p50_ms": percentile(latencies, 50),
                    "probe_p99_ms": percentile(latencies, 99),
                    "probe_max_ms": latencies[-1] if latencies else math.nan,
                }
                os.write(ready, json.dumps(summary).encode())
                return
            try:
                data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if key.fd in prompt:
                now = time.time_ns()
                *lines, prompt[key.fd] = (prompt[key.fd] + data).split(b"\n")
                latencies.extend((now - int(line[:19])) / 1e6 for line in lines)


def measure(args: argparse.Namespace, nodelay: bool) -> dict[str, float]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(min(args.subscribers, 4096))
    port = listener.getsockname()[1]
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child never returns
        try:
            listener.close()
            reader(port, args.subscribers, args.batch_bytes, ready_w, stop_r)
        finally:
            os._exit(0)
    try:
        os.sched_setaffinity(0, {0})
        connections = []
        for _ in range(args.subscribers):
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
            connections.append(conn)
        if os.read(ready_r, 1) != b"x":
            raise BenchError("the reader process did not start")
        time.sleep(args.settle)
        pad = b"x" * (args.message_bytes - 20)
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        for round_ in range(args.rounds):
            data = b"%019d" % time.time_ns() + pad + b"\n"
            for conn in connections:
                conn.send(data)
            wait = started + (round_ + 1) / args.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(args.settle)  # the prompt readers read what is in flight
        os.write(stop_w, b"x")
        probes = json.loads(os.read(ready_r, 4096))
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        listener.close()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    writes = args.subscribers * args.rounds
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    return {
        "writes": writes,
        "user_us_per_write": 1e6 * user / writes,
        "system_us_per_write": 1e6 * system / writes,
        "cpu_percent": 100 * (user + system) / elapsed,
        "rounds_per_second": args.rounds / elapsed,
        **probes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1000, help="messages sent to every one")
    parser.add_argument("--rate", type=float, default=200.0, help="rounds per second (at most)")
    parser.add_argument(
        "--message-bytes", type=int, default=130, help="bytes per write (at least 21)"
    )
    parser.add_argument(
        "--batch-bytes", type=int, default=16384, help="about the SO_RCVLOWAT of 9 in 10 readers"
    )
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 CPUs: the writer on CPU 0, the readers on CPU 1")
    for name in ("subscribers", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.message_bytes < 21:
        parser.error("--message-bytes must be at least 21 (a 19-digit send time and a newline)")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    results = {
        "TCP_NODELAY on": measure(args, nodelay=True),
        "TCP_NODELAY off (Nagle)": measure(args, nodelay=False),
    }
    print(
        f"{args.subscribers} loopback connections, {args.rounds} rounds of one "
        f"{args.message_bytes}-byte send to each at up to {args.rate:g} rounds/s, "
        "writer on CPU 0, readers on CPU 1\n"
    )
    rows = [
        [
            name,
            f"{r['user_us_per_write']:.2f}",
            f"{r['system_us_per_write']:.2f}",
            f"{r['cpu_percent']:.0f}%",
            f"{r['rounds_per_second']:.0f}",
            f"{r['probe_p50_ms']:.2f} / {r['probe_p99_ms']:.2f} / {r['probe_max_ms']:.2f}",
        ]
        for name, r in results.items()
    ]
    headers = [
        "",
        "user µs per write",
        "system µs per write",
        "writer CPU",
        "rounds/s",
        "prompt readers' p50 / p99 / max ms",
    ]
    print(markdown_table(headers, rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(), "args": vars(args), "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main, "write_cost")
