"""Shared pieces of the benchmarks: a pinned hub process, the machine, and small statistics.

The benchmarks import this module as a sibling (``python bench/<name>.py`` puts ``bench/`` on
``sys.path``); it is not part of the installed package.

:class:`HubProcess` runs ``backchannel serve --port 0`` under ``taskset -c CPU``, waits for the
``backchannel listening on http://HOST:PORT`` line, and stops the process (SIGINT, then SIGKILL)
when its ``with`` block ends, whether by return, exception or Ctrl-C. Every child process is
started in its own session so that a Ctrl-C reaches only the benchmark script, which then
stops its children itself, in order.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

READY_LINE = re.compile(rb"backchannel listening on http://([^ ]+):(\d+)")
TCP_PART = re.compile(rb" and tcp://[^ ]+:(\d+)")
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class BenchError(RuntimeError):
    """The benchmark could not run as asked (a missing tool, a hub that did not start...)."""


def run_main(main: Callable[[], int], name: str) -> None:
    """A benchmark script's entry point: exit with ``main()``'s status, with ``name: reason``
    for a benchmark that could not run, and with 130 on Ctrl-C."""
    try:
        sys.exit(main())
    except (BenchError, OSError) as exc:
        sys.exit(f"{name}: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (on Debian: apt-get install -y {name})")
    return path


def handle_stop_signals() -> None:
    """Make SIGINT raise ``KeyboardInterrupt`` (even when started in the background, where it
    is ignored by default) and SIGTERM raise ``SystemExit``, so that ``finally`` blocks stop the
    child processes."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = STOP_TIMEOUT) -> None:
    """SIGINT (a graceful stop for the hub and wrk), then SIGKILL if it does not exit."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


@dataclass
class HubProcess:
    """``backchannel serve`` pinned to one CPU, with its data in a fresh temporary folder.

    ``extra_args`` go after ``serve`` (e.g. ``["--sqlite-synchronous", "full"]`` or
    ``["--store", "memory://"]``). The hub's stdout and stderr go to ``hub.log`` beside its data;
    its tail is part of the error when the hub fails to start or exits early, and
    :meth:`logged_errors` finds the errors it logged while running. The folder is removed when
    the hub stops.
    """

    extra_args: Sequence[str] = ()
    cpu: int = 0
    tmp_root: str | None = None
    url: str = field(init=False, default="")
    #: The TCP protocol's port, or 0 when the hub runs with ``--no-tcp``.
    tcp_port: int = field(init=False, default=0)
    data_dir: Path = field(init=False)
    _tmp: tempfile.TemporaryDirectory[str] = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _log: IO[bytes] | None = field(init=False, default=None)
    _drain: threading.Thread | None = field(init=False, default=None)

    @property
    def command(self) -> list[str]:
        return [
            "taskset",
            "-c",
            str(self.cpu),
            sys.executable,
            "-m",
            "backchannel",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--tcp-port",
            "0",  # a fixed TCP port would clash with any other hub on the machine
            "--data-dir",
            str(self.data_dir),
            *self.extra_args,
        ]

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchError("the hub is not running")
        return self._proc.pid

    def __enter__(self) -> HubProcess:
        require_tool("taskset")
        self._tmp = tempfile.TemporaryDirectory(prefix="backchannel-bench-", dir=self.tmp_root)
        self.data_dir = Path(self._tmp.name) / "data"
        try:
            self._start()
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

    def _start(self) -> None:
        self._log = open(Path(self._tmp.name) / "hub.log", "wb")  # noqa: SIM115 - closed in _stop
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        found = _read_ready_line(self._proc, self._log, STARTUP_TIMEOUT)
        if found is None:
            raise BenchError(f"the hub did not start; its log:\n{self._log_text()}")
        self.url = f"http://{found[0]}:{found[1]}"
        self.tcp_port = int(found[2]) if found[2] else 0
        # Keep reading stdout so that the hub never blocks on a full pipe.
        self._drain = threading.Thread(
            target=_copy, args=(self._proc.stdout, self._log), daemon=True
        )
        self._drain.start()

    def check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise BenchError(f"the hub exited early; its log:\n{self._log_text()}")

    def logged_errors(self) -> list[str]:
        """Lines of the hub's log so far that report an error or a traceback."""
        return [
            line
            for line in self._log_text(tail=None).splitlines()
            if " ERROR " in line or line.startswith(("ERROR:", "Traceback"))
        ]

    def _log_text(self, tail: int | None = 4000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        text = (Path(self._tmp.name) / "hub.log").read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def _stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        if self._drain is not None:
            self._drain.join(timeout=2)
        if self._log is not None:
            self._log.close()
        self._tmp.cleanup()


def _read_ready_line(
    proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float
) -> tuple[str, str, str] | None:
    """Read the hub's stdout until the ready line, the hub's exit, or the timeout: the HTTP
    host and port, and the TCP port ("" without TCP)."""
    assert proc.stdout is not None
    result: list[tuple[str, str, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            match = READY_LINE.search(line)
            if match:
                tcp = TCP_PART.search(line, match.end())
                result.append(
                    (
                        match.group(1).decode(),
                        match.group(2).decode(),
                        tcp.group(1).decode() if tcp else "",
                    )
                )
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else None


def _copy(source: IO[bytes], sink: IO[bytes]) -> None:
    with contextlib.suppress(ValueError, OSError):  # the sink closes when the hub stops
        for line in source:
            sink.write(line)


@contextlib.contextmanager
def running(command: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with piped stdout and stderr, stopped when the block ends however it
    ends."""
    proc = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc)


# -- the machine --------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def filesystem_type(path: str) -> str:
    """The file system type of ``path`` (``ext4``, ``tmpfs``...), which decides what fsync costs."""
    try:
        out = subprocess.run(
            ["df", "--output=fstype", path], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    lines = out.stdout.split()
    return lines[-1] if len(lines) > 1 else "unknown"


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by process ``pid`` (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the ")" closing field 2.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- statistics ---------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def spread_batch(batch_bytes: int, index: int) -> int:
    """The ``SO_RCVLOWAT`` of the ``index``-th untimed subscriber: spread over
    [batch_bytes / 2, 3 * batch_bytes / 2) so that the untimed subscribers, who all receive the
    same bytes at about the same time, do not all wake the load generator at once. With one
    shared mark, every ~16 KiB the 900 of them woke together, and the probes read behind that
    burst: it added up to ~40 ms to both servers' p99 (more than the servers' own tails)."""
    if not batch_bytes:
        return 0
    return batch_bytes // 2 + (index * 7919) % batch_bytes
