"""A real ``redis-server`` on a free loopback port, for the tests that need Redis.

One server runs for the whole session (see ``tests/conftest.py``); each test keeps its keys
apart under a prefix of its own, so tests never see each other's data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process in ``folder``. ``start()`` returns once it answers PING."""

    def __init__(self, folder: Path, *extra: str) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(
                "redis-server is not installed: run scripts/test (installs redis-server), or "
                "apt-get install redis-server"
            )
        self.executable = executable
        self.folder = folder
        self.extra = extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for(self, prefix: str | None = None) -> str:
        """A store URL with a fresh key prefix (or the one given)."""
        return f"{self.url}?prefix={prefix or new_prefix()}"

    def start(self) -> RedisServer:
        command = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            *self.extra,
        ]
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            if self.command("PING") == "PONG":
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer in {START_TIMEOUT} s: {self.log()}")

    def command(self, *args: str) -> str | None:
        """One command over a plain socket (inline protocol): its first reply line, or None
        when the server does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall((" ".join(args) + "\r\n").encode())
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return None
        line = reply.decode(errors="replace").split("\r\n", 1)[0]
        return line[1:] if line[:1] in ("+", "-", ":") else line

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(20)
        self.proc = None


def new_prefix() -> str:
    return "t" + uuid.uuid4().hex[:16]
