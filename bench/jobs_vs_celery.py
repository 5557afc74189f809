"""Jobs: backchannel's job queue against Celery (Redis broker and result backend), one run.

Server side on CPU 0 (``taskset -c 0``): the hub process; for Celery, ``redis-server`` AND the
``celery worker`` process (which runs the tasks). Load generator on CPU 1: this script, and for
the hub also the worker process that claims and completes the jobs (a hub worker is a client of
the hub, a Celery worker is part of Celery's server side).

Measures, for the hub with ``--store memory://`` and with the default SQLite store, and for
Celery:

throughput (the headline)
    N no-op jobs (``--jobs``, 10,000; payload ``{"n": i}``, the task returns its payload),
    the way docs/jobs.md tells you to run many jobs. The hub's client is one
    :class:`~backchannel.client.aio.AsyncClient`: ``handles = await client.submit_many(...)``
    (one request per 1,000 jobs), then ``await client.wait_all(handles)`` (one event stream
    that pushes each result). The hub's worker is the SDK's
    :class:`~backchannel.client.worker.Worker` in a separate process on CPU 1, with
    ``--concurrency`` (8) threads and its default prefetch (which follows the jobs; or
    ``--prefetch N``): it claims jobs in batches
    (``claim?max=``) and reports their ends in batches (``POST /v1/queues/{q}/results``).
    Celery: ``task.delay()`` for all N, then ``.get()`` for each, with the worker started as
    ``celery worker --pool threads --concurrency 8`` (``--celery-pool``/``--concurrency``).
    Reported: jobs/s = N / wall time from the first submit to the last result, server CPU
    seconds (``/proc/PID/stat`` utime + stime: the hub; redis-server + the celery worker and
    its children) and CPU seconds per 1000 jobs. Every result is checked.
throughput one job per request (for comparison, the hub only)
    The same N jobs with one request per step: ``--in-flight`` (8) coroutines each doing
    ``handle = await client.submit(...)`` then ``await handle.result()`` (a long poll), and a
    worker process of ``--claimers`` (4) asyncio coroutines looping ``AsyncClient.claim`` /
    ``AsyncClient.complete``: four requests per job.
latency
    M round trips one at a time (``--round-trips``, 500): submit, a worker completes, the
    client has the result. Hub (with the SDK Worker): ``submit(..., wait=5)``
    (``Prefer: wait=5``, one request) and ``submit(...)`` then ``handle.result()``; Celery:
    ``task.delay(i).get()``. Reported: p50 / p99 / max in ms.

Each side first runs ``--warmup`` (200) jobs, not measured. Ratios are backchannel / Celery.
``--json PATH`` writes everything; the exit status is 1 when a check failed. Every process the
script starts is stopped (SIGINT, then SIGKILL) and every temporary folder removed when it
ends, also on Ctrl-C, SIGTERM or an error.

Requirements: ``redis-server`` on ``PATH`` and ``celery[redis]`` importable (both only for
this benchmark: ``apt-get install -y redis-server``, ``pip install 'celery[redis]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
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

QUEUE = "bench"
SERVER_CPU = 0
CLIENT_CPU = 1


# -- results ------------------------------------------------------------------------------------


@dataclass
class Throughput:
    jobs: int = 0
    seconds: float = 0.0
    jobs_per_s: float = 0.0
    server_cpu_s: float = 0.0
    worker_cpu_s: float | None = None  # the hub's worker process (a client, on CPU 1)
    client_cpu_s: float = 0.0
    wrong: int = 0


@dataclass
class Latency:
    round_trips: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    wrong: int = 0


@dataclass
class SideResult:
    name: str
    setup: str
    throughput: Throughput = field(default_factory=Throughput)
    single: Throughput | None = None  # the hub, one job per request
    latency: dict[str, Latency] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def latency_of(samples: Sequence[float], wrong: int) -> Latency:
    ordered = sorted(samples)
    return Latency(
        round_trips=len(ordered),
        p50_ms=percentile(ordered, 50) * 1000,
        p99_ms=percentile(ordered, 99) * 1000,
        max_ms=ordered[-1] * 1000 if ordered else 0.0,
        mean_ms=statistics.fmean(ordered) * 1000 if ordered else 0.0,
        wrong=wrong,
    )


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds of the given processes and of their living descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    total = 0.0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            total += process_cpu_seconds(pid)
        todo.extend(children.get(pid, []))
    return total


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def started(command: Sequence[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (own session, output to ``log``), stopped when the block ends."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
        try:
            yield proc
        finally:
            stop_process(proc)


def tail(log: Path, size: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-size:]
    return ""


# -- the hub ------------------------------------------------------------------------------------


async def hub_worker_single(url: str, claimers: int) -> None:
    """Claim and complete jobs one per request with ``claimers`` coroutines until cancelled."""
    from backchannel.client import AsyncClient

    async with AsyncClient(url, max_connections=claimers + 4, max_keepalive=claimers + 4) as c:

        async def loop() -> None:
            while True:
                job = await c.claim(QUEUE, wait=5.0, lease=30.0)
                if job is not None:
                    await c.complete(job, job.payload)

        await asyncio.gather(*(loop() for _ in range(claimers)))


def hub_worker_main(url: str, mode: str, concurrency: int, prefetch: int | None) -> None:
    """The hub's worker process (``--worker-of URL``)."""
    if mode == "sdk":
        from backchannel.client import worker as worker_module

        worker_module.CLAIM_WAIT = 1.0  # stop within a second of SIGINT
        worker = worker_module.Worker(url, concurrency=concurrency, prefetch=prefetch)
        worker.task(QUEUE)(lambda payload: payload)
        worker.run()
        return
    handle_stop_signals()
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        run_async(hub_worker_single(url, concurrency))


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def hub_throughput_batched(url: str, count: int, start: int) -> tuple[float, int]:
    """submit_many, then wait_all: the documented way to run many jobs."""
    from backchannel.client import AsyncClient

    async with AsyncClient(url) as c:
        began = time.perf_counter()
        handles = await c.submit_many(QUEUE, [{"n": start + i} for i in range(count)])
        jobs = await c.wait_all(handles, timeout=120)
        seconds = time.perf_counter() - began
    wrong = sum(
        1
        for i, job in enumerate(jobs)
        if job.state != "succeeded" or job.result != {"n": start + i}
    )
    return seconds, wrong


async def hub_throughput(url: str, count: int, in_flight: int, start: int) -> tuple[float, int]:
    from backchannel.client import AsyncClient

    wrong = 0
    gate = asyncio.Semaphore(in_flight)
    async with AsyncClient(url, max_connections=in_flight + 4, max_keepalive=in_flight + 4) as c:

        async def one(i: int) -> None:
            nonlocal wrong
            async with gate:
                handle = await c.submit(QUEUE, {"n": i})
                result = await handle.result(timeout=60)
            if result != {"n": i}:
                wrong += 1

        began = time.perf_counter()
        await asyncio.gather(*(one(start + i) for i in range(count)))
        return time.perf_counter() - began, wrong


async def hub_latency(url: str, count: int, prefer_wait: bool) -> tuple[list[float], int]:
    from backchannel.client import AsyncClient

    samples: list[float] = []
    wrong = 0
    async with AsyncClient(url) as c:
        for i in range(count):
            began = time.perf_counter()
            if prefer_wait:
                handle = await c.submit(QUEUE, {"n": i}, wait=5)
                job = handle.last
                result = job.result if job.state == "succeeded" else await handle.result(60)
            else:
                handle = await c.submit(QUEUE, {"n": i})
                result = await handle.result(60)
            samples.append(time.perf_counter() - began)
            if result != {"n": i}:
                wrong += 1
    return samples, wrong


def run_hub(args: argparse.Namespace, store: str, tmp: Path) -> SideResult:
    extra = ["--log-level", "warning", "--no-tcp"]
    if store == "memory":
        extra += ["--store", "memory://"]
    label = "memory://" if store == "memory" else "SQLite (default)"
    side = SideResult(
        name=f"backchannel {label}",
        setup=f"hub `--store {'memory://' if store == 'memory' else '(default)'}` on CPU 0; "
        f"SDK Worker ({args.concurrency} threads, prefetch "
        f"{'following the jobs' if args.prefetch is None else args.prefetch}) in a process on "
        "CPU 1; client AsyncClient: submit_many + wait_all"
        + (
            ""
            if args.no_single
            else f". One job per request: {args.in_flight} submit + result() in flight, a "
            f"worker process of {args.claimers} claim/complete loops"
        ),
    )

    def worker_command(mode: str, concurrency: int) -> list[str]:
        return [
            "taskset", "-c", str(CLIENT_CPU), sys.executable, __file__,
            "--worker-of", hub.url, "--hub-worker", mode,
            "--concurrency", str(concurrency),
            *(["--prefetch", str(args.prefetch)] if args.prefetch is not None else []),
        ]  # fmt: skip

    def measure(run: Any, worker: subprocess.Popen[bytes]) -> Throughput:
        hub_cpu0 = process_cpu_seconds(hub.pid)
        worker_cpu0 = process_cpu_seconds(worker.pid)
        client_cpu0 = self_cpu()
        seconds, wrong = run_async(run)
        return Throughput(
            jobs=args.jobs,
            seconds=seconds,
            jobs_per_s=args.jobs / seconds,
            server_cpu_s=process_cpu_seconds(hub.pid) - hub_cpu0,
            worker_cpu_s=process_cpu_seconds(worker.pid) - worker_cpu0,
            client_cpu_s=self_cpu() - client_cpu0,
            wrong=wrong,
        )

    with HubProcess(extra, cpu=SERVER_CPU, tmp_root=args.tmp_dir) as hub:
        log = tmp / f"hub-worker-{store}.log"
        with started(worker_command("sdk", args.concurrency), log) as worker:
            run_async(hub_throughput_batched(hub.url, args.warmup, 10_000_000))
            side.throughput = measure(hub_throughput_batched(hub.url, args.jobs, 0), worker)
            for name, prefer in (("submit wait=5", True), ("submit + result()", False)):
                samples, bad = run_async(hub_latency(hub.url, args.round_trips, prefer))
                side.latency[name] = latency_of(samples, bad)
            if worker.poll() is not None:
                side.errors.append(f"the hub worker exited early: {tail(log)}")
        if not args.no_single:
            log = tmp / f"hub-single-worker-{store}.log"
            with started(worker_command("single", args.claimers), log) as worker:
                start = 20_000_000
                run_async(hub_throughput(hub.url, args.warmup, args.in_flight, start))
                single = hub_throughput(hub.url, args.jobs, args.in_flight, 2 * start)
                side.single = measure(single, worker)
                if worker.poll() is not None:
                    side.errors.append(f"the one-job worker exited early: {tail(log)}")
        hub.check_alive()
        side.errors += hub.logged_errors()
    return side


# -- Celery -------------------------------------------------------------------------------------

TASKS_MODULE = """\
import os

from celery import Celery

app = Celery("bench_tasks", broker=os.environ["BENCH_REDIS"], backend=os.environ["BENCH_REDIS"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.echo")
def echo(payload):
    return payload
"""


def wait_for_redis(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"redis-server exited: {tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise BenchError(f"redis-server did not answer: {tail(log)}")


def run_celery(args: argparse.Namespace, tmp: Path) -> SideResult:
    redis_server = require_tool("redis-server")
    celery_bin = shutil.which("celery", path=str(Path(sys.executable).parent)) or shutil.which(
        "celery"
    )
    if celery_bin is None:
        raise BenchError("celery is not installed (pip install 'celery[redis]')")
    folder = tmp / "celery"
    folder.mkdir()
    (folder / "bench_tasks.py").write_text(TASKS_MODULE)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    concurrency = 1 if args.celery_pool == "solo" else args.concurrency
    side = SideResult(
        name="Celery",
        setup=f"redis-server + `celery worker --pool {args.celery_pool} --concurrency "
        f"{concurrency}` on CPU 0; client on CPU 1",
    )
    redis_cmd = [
        "taskset", "-c", str(SERVER_CPU), redis_server, "--port", str(port), "--bind",
        "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder),
        "--daemonize", "no",
    ]  # fmt: skip
    worker_cmd = [
        "taskset", "-c", str(SERVER_CPU), celery_bin, "-A", "bench_tasks", "worker",
        "--pool", args.celery_pool, "--concurrency", str(concurrency), "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    env = {**os.environ, "BENCH_REDIS": url, "PYTHONPATH": str(folder)}
    with (
        started(redis_cmd, folder / "redis.log") as redis,
        contextlib.ExitStack() as stack,
    ):
        wait_for_redis(port, redis, folder / "redis.log")
        worker = stack.enter_context(
            started(worker_cmd, folder / "worker.log", cwd=folder, env=env)
        )
        os.environ["BENCH_REDIS"] = url
        sys.path.insert(0, str(folder))
        try:
            import bench_tasks  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(folder))
        stack.callback(bench_tasks.app.close)
        echo = bench_tasks.echo
        try:
            for i in range(args.warmup):
                echo.delay({"n": i}).get(timeout=60)
        except Exception as exc:
            raise BenchError(
                f"the celery worker did not answer: {exc}\n{tail(folder / 'worker.log')}"
            ) from exc
        pids = [redis.pid, worker.pid]
        cpu0 = tree_cpu_seconds(pids)
        client_cpu0 = self_cpu()
        began = time.perf_counter()
        pending = [echo.delay({"n": i}) for i in range(args.jobs)]
        wrong = 0
        for i, result in enumerate(pending):
            if result.get(timeout=120) != {"n": i}:
                wrong += 1
        seconds = time.perf_counter() - began
        t = side.throughput
        t.jobs, t.seconds, t.wrong = args.jobs, seconds, wrong
        t.jobs_per_s = args.jobs / seconds
        t.server_cpu_s = tree_cpu_seconds(pids) - cpu0
        t.client_cpu_s = self_cpu() - client_cpu0
        for result in pending:
            result.forget()
        samples: list[float] = []
        wrong = 0
        for i in range(args.round_trips):
            began = time.perf_counter()
            value = echo.delay({"n": i}).get(timeout=60)
            samples.append(time.perf_counter() - began)
            if value != {"n": i}:
                wrong += 1
        side.latency["delay().get()"] = latency_of(samples, wrong)
        if worker.poll() is not None or redis.poll() is not None:
            side.errors.append(f"a Celery process exited early: {tail(folder / 'worker.log')}")
    return side


# -- report -------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def report(sides: list[SideResult]) -> str:
    hubs = [s for s in sides if s.name.startswith("backchannel")]
    celery = next((s for s in sides if s.name == "Celery"), None)
    headers = ["measure", *[s.name for s in sides]]
    if celery:
        headers += [f"ratio {s.name.removeprefix('backchannel ')} / Celery" for s in hubs]

    def row(label: str, values: list[float], fmt: str) -> list[str]:
        cells = [label, *[format(v, fmt) for v in values]]
        if celery:
            c = values[sides.index(celery)]
            cells += [ratio(values[sides.index(h)], c) for h in hubs]
        return cells

    def throughput_rows(tp: list[Throughput], how: str) -> list[list[str]]:
        return [
            row(f"**throughput jobs/s, {how}**", [t.jobs_per_s for t in tp], ",.0f"),
            row(f"wall s, {how}", [t.seconds for t in tp], ".2f"),
            row(f"server CPU s, {how}", [t.server_cpu_s for t in tp], ".2f"),
            row(
                f"server CPU ms / 1000 jobs, {how}",
                [t.server_cpu_s / t.jobs * 1e6 for t in tp],
                ".0f",
            ),
            [
                f"hub worker process CPU s (CPU 1), {how}",
                *[f"{t.worker_cpu_s:.2f}" if t.worker_cpu_s is not None else "-" for t in tp],
                *(["" for _ in hubs] if celery else []),
            ],
            row(f"client CPU s, {how}", [t.client_cpu_s for t in tp], ".2f"),
        ]

    rows = throughput_rows([s.throughput for s in sides], "batched")
    if all(h.single is not None for h in hubs):
        # Celery has one way; its numbers stand in both rows so that both ratios are against it.
        singles = [s.single or s.throughput for s in sides]
        rows += throughput_rows(singles, "one job per request")
    kinds = [("submit wait=5", "delay().get()"), ("submit + result()", "delay().get()")]
    for hub_kind, celery_kind in kinds:
        for stat in ("p50_ms", "p99_ms", "max_ms"):

            def pick(
                s: SideResult,
                hub_kind: str = hub_kind,
                celery_kind: str = celery_kind,
                stat: str = stat,
            ) -> float:
                kind = celery_kind if s is celery else hub_kind
                return float(getattr(s.latency[kind], stat))

            bold = "**" if stat == "p50_ms" else ""
            label = f"{bold}round trip {stat[:-3]} ms, hub: {hub_kind}{bold}"
            rows.append(row(label, [pick(s) for s in sides], ".2f"))
    checks = [
        "check",
        *[
            "ok"
            if not s.errors
            and not s.throughput.wrong
            and not (s.single and s.single.wrong)
            and not any(v.wrong for v in s.latency.values())
            else "FAILED"
            for s in sides
        ],
        *(["" for _ in hubs] if celery else []),
    ]
    rows.append(checks)
    setups = "\n".join(f"- **{s.name}**: {s.setup}" for s in sides)
    return markdown_table(headers, rows) + "\n\n" + setups


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=textwrap.dedent(__doc__ or "").split("\n\n")[0],
        epilog="See the module docstring and bench/README.md for what is measured.",
    )
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in the throughput run")
    parser.add_argument("--round-trips", type=int, default=500, help="jobs in the latency run")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured jobs first")
    parser.add_argument(
        "--in-flight", type=int, default=8, help="hub client jobs in flight (default: 8)"
    )
    parser.add_argument("--hub-worker", choices=("sdk", "single"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--claimers", type=int, default=4, help="loops of the one-job-per-request worker (4)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="threads of the SDK Worker and of Celery (8)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="the SDK Worker's prefetch (default: the Worker's own, which follows the jobs)",
    )
    parser.add_argument("--celery-pool", choices=("threads", "prefork", "solo"), default="threads")
    parser.add_argument(
        "--no-single",
        action="store_true",
        help="skip the hub's one-job-per-request throughput run (it takes most of the time)",
    )
    parser.add_argument(
        "--sides",
        default="memory,sqlite,celery",
        help="comma-separated: memory, sqlite, celery (default: all)",
    )
    parser.add_argument("--tmp-dir", help="where the temporary folders go")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--worker-of", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_of:
        hub_worker_main(args.worker_of, args.hub_worker, args.concurrency, args.prefetch)
        return 0
    handle_stop_signals()
    require_tool("taskset")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs at least two CPUs")
    os.sched_setaffinity(0, {CLIENT_CPU})
    sides: list[SideResult] = []
    wanted = [s.strip() for s in args.sides.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="jobs-vs-celery-", dir=args.tmp_dir) as name:
        tmp = Path(name)
        for which in wanted:
            print(f"running {which}...", file=sys.stderr, flush=True)
            if which in ("memory", "sqlite"):
                sides.append(run_hub(args, which, tmp))
            elif which == "celery":
                sides.append(run_celery(args, tmp))
            else:
                raise BenchError(f"unknown side {which!r}")
    print(report(sides))
    failed = [s for s in sides if s.errors or s.throughput.wrong or (s.single and s.single.wrong)]
    failed += [s for s in sides if any(v.wrong for v in s.latency.values())]
    for s in failed:
        for error in s.errors:
            print(f"{s.name}: {error}", file=sys.stderr)
    if args.json:
        document = {
            "machine": machine(),
            "args": {k: v for k, v in vars(args).items() if k != "worker_of"},
            "sides": [asdict(s) for s in sides],
        }
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
