"""Server-sent events with the npm ``eventsource`` client (version 4), a real Node.js peer.

The client receives live messages; then the hub is restarted (SIGTERM: the stream ends with a
``retry:``) and killed (SIGKILL: the stream just drops), and each time messages are published
while the client is away. The client reconnects by itself with ``Last-Event-ID``, and gets
every message exactly once, in order. To make "while away" certain, the client process is
stopped (SIGSTOP) from before the hub goes down until after the publishes, so that it cannot
reconnect before them.

Browsers' own EventSource is checked in tests/e2e/test_browser.py.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import HubProcess

pytestmark = pytest.mark.e2e

JS = Path(__file__).parent / "js"
#: No assertion is about time: this only stops a broken test from hanging.
LINE_TIMEOUT = 30.0


class NodeClient:
    """The Node.js client process, its JSON lines read by a thread."""

    def __init__(self, url: str, count: int) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is missing: apt-get install nodejs npm")
        if not (JS / "node_modules" / "eventsource").is_dir():
            pytest.fail(
                "eventsource is not installed: run scripts/test (npm ci in tests/reliability/js)"
            )
        self.proc = subprocess.Popen(
            [node, str(JS / "sse_client.mjs"), url, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, kind: str) -> dict[str, Any]:
        """The next line that has ``kind`` (open, id, error), skipping others."""
        while True:
            try:
                line = self.lines.get(timeout=LINE_TIMEOUT)
            except queue.Empty:
                stderr = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""  # type: ignore[union-attr]
                raise AssertionError(f"no {kind!r} line from the client; {stderr}") from None
            if kind in line:
                return line

    def messages(self, count: int) -> list[dict[str, Any]]:
        return [self.next("id") for _ in range(count)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def hub(hub_factory: type[HubProcess]) -> HubProcess:
    # A short retry: the client comes back 0.2 s after the stream ends.
    return hub_factory("--no-tcp", "--sse-retry", "0.2").start()


@pytest.fixture
def client(hub: HubProcess) -> Iterator[NodeClient]:
    node = NodeClient(f"{hub.url}/v1/channels/es/events", count=30)
    yield node
    node.stop()


def publish(hub: HubProcess, numbers: range) -> None:
    with hub.client() as http:
        for n in numbers:
            response = http.post("/v1/channels/es/messages", json={"n": n})
            assert response.status_code == 201


def restart(hub: HubProcess, client: NodeClient, *, kill: bool, numbers: range) -> None:
    """Take the hub down and up on the same port, publishing ``numbers`` before the client
    can reconnect."""
    port = str(urlsplit(hub.url).port)
    client.proc.send_signal(signal.SIGSTOP)
    try:
        if kill:
            hub.kill()
        else:
            assert hub.terminate() == 0
        hub.start("--port", port)
        publish(hub, numbers)
    finally:
        client.proc.send_signal(signal.SIGCONT)


def test_eventsource_resumes_without_gap_or_duplicate(hub: HubProcess, client: NodeClient) -> None:
    client.next("open")
    publish(hub, range(0, 10))
    received = client.messages(10)

    restart(hub, client, kill=False, numbers=range(10, 15))
    client.next("open")  # it reconnected by itself
    received += client.messages(5)
    publish(hub, range(15, 20))  # live again
    received += client.messages(5)

    restart(hub, client, kill=True, numbers=range(20, 25))
    client.next("open")
    received += client.messages(5)
    publish(hub, range(25, 30))
    received += client.messages(5)

    assert [json.loads(m["data"])["data"]["n"] for m in received] == list(range(30))
    ids = [int(m["id"], 16) for m in received]
    assert ids == list(range(1, 31)), "every message once, in order"
    assert client.proc.wait(LINE_TIMEOUT) == 0  # it stopped after its 30 messages
