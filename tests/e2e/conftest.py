"""A real ``backchannel serve`` process on an ephemeral port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..redis_server import RedisServer

LISTENING = re.compile(r"backchannel listening on (http://\S+)(?: and tcp://(\S+):(\d+))?")
START_TIMEOUT = 30.0


class HubProcess:
    """One hub process. ``start()`` returns once it prints that it listens. ``wrapper`` is a
    command the hub runs under (``("prlimit", "--nofile=256")``)."""

    wrapper: tuple[str, ...] = ()

    def __init__(self, data_dir: Path, log_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.tcp_port = 0
        self.starts = 0

    def start(self, *extra: str) -> HubProcess:
        self.starts += 1
        name = f"hub-{id(self):x}-{self.starts}"
        self.out_path = self.log_dir / f"{name}.out"
        self.err_path = self.log_dir / f"{name}.err"
        command = [
            *self.wrapper,
            sys.executable,
            "-m",
            "backchannel",
            "serve",
            "--port",
            "0",
            "--tcp-port",
            "0",
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "warning",
            *self.args,
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = LISTENING.search(self.out_path.read_text())
            if found:
                self.url = found.group(1)
                self.tcp_port = int(found.group(3)) if found.group(3) else 0
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.02)
        raise RuntimeError(f"hub did not start in {START_TIMEOUT} s: {self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 10) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[type[HubProcess]]:
    started: list[HubProcess] = []

    class Factory(HubProcess):
        def __init__(self, *args: str, data_dir: Path | None = None) -> None:
            super().__init__(data_dir or tmp_path / "data", tmp_path, *args)
            started.append(self)

    yield Factory
    for hub in started:
        hub.stop()


STORES = ("sqlite", "redis")
#: The store of a plain ``hub``: SQLite unless ``TEST_HUB_STORE=redis`` says otherwise, to run
#: every end-to-end test against Redis at once. Two then fail, rightly: one about SQLite files,
#: and one that counts the hub's sockets (the Redis pool's count too).
DEFAULT_STORE = os.environ.get("TEST_HUB_STORE", "sqlite")
#: Runs a test that takes ``hub`` once per store: the default SQLite file, and a real
#: redis-server (a fresh key prefix per test).
on_every_store = pytest.mark.parametrize("hub", STORES, indirect=True)


def store_args(request: pytest.FixtureRequest, store: str) -> tuple[str, ...]:
    """The flags that start a hub on ``store``."""
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return ("--store", server.url_for())
    return ()


@pytest.fixture
def hub(request: pytest.FixtureRequest, hub_factory: type[HubProcess]) -> HubProcess:
    """A hub on SQLite, or on the store named by ``on_every_store``."""
    return hub_factory(*store_args(request, getattr(request, "param", DEFAULT_STORE))).start()
