"""Headless Chromium driven over the Chrome DevTools Protocol, for end-to-end browser tests.

:class:`Chromium` owns one browser process (started on first use, killed by :meth:`kill`, which
the tests' fixture finalizer calls). :meth:`Chromium.page` opens a fresh tab and yields a
:class:`Page`: a CDP session on that tab's ``webSocketDebuggerUrl`` that can navigate, evaluate
JavaScript (awaiting promises) and poll an expression until it holds. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)
START_TIMEOUT = 30.0
CALL_TIMEOUT = 10.0


class CDPError(RuntimeError):
    """A CDP command failed, or JavaScript threw."""


class Page:
    """One tab, reached over its own DevTools WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: list[dict[str, Any]] = []
        self._event_arrived = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self._pending.pop(message["id"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    self._events.append(message)
                    self._event_arrived.set()
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("the DevTools connection closed"))
            self._pending.clear()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = CALL_TIMEOUT
    ) -> dict[str, Any]:
        """Run one CDP command and return its ``result``."""
        if self._reader.done():
            raise CDPError("the DevTools connection is closed")
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        try:
            async with asyncio.timeout(timeout):
                reply = await future
        finally:
            self._pending.pop(call_id, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def wait_event(self, method: str, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """Return (and consume) the first event named ``method`` received so far or later."""
        async with asyncio.timeout(timeout):
            while True:
                for n, event in enumerate(self._events):
                    if event["method"] == method:
                        del self._events[n]
                        params: dict[str, Any] = event.get("params", {})
                        return params
                self._event_arrived.clear()
                await self._event_arrived.wait()

    def received(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every ``method`` event received and not yet taken by
        :meth:`wait_event` (enable its CDP domain first, e.g. ``Network.enable``)."""
        return [e.get("params", {}) for e in self._events if e["method"] == method]

    async def navigate(self, url: str, timeout: float = CALL_TIMEOUT) -> None:
        """Load ``url`` and wait for its ``load`` event."""
        await self.send("Page.enable")
        self._events = [e for e in self._events if e["method"] != "Page.loadEventFired"]
        result = await self.send("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        await self.wait_event("Page.loadEventFired", timeout)

    async def evaluate(self, expression: str, timeout: float = CALL_TIMEOUT) -> Any:
        """The JSON value of ``expression`` in the page, after awaiting it if it is a promise."""
        result = await self.send(
            "Runtime.evaluate",
            {
                "expression": expression,
                "awaitPromise": True,
                "returnByValue": True,
                "timeout": int(timeout * 1000),
            },
            timeout + 1,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{expression[:80]!r} threw: {text}")
        return result["result"].get("value")

    async def wait_for(
        self, expression: str, timeout: float, interval: float = 0.05, what: str = ""
    ) -> Any:
        """Evaluate ``expression`` until it is truthy and return that value; fail after
        ``timeout`` seconds, showing the last value."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(interval)
        raise AssertionError(
            f"{what or expression} did not hold within {timeout} s; last value: {value!r}"
        )

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self._ws.close()


class Chromium:
    """A headless Chromium process with remote debugging on an ephemeral port."""

    def __init__(self, user_data_dir: Path, binary: str = CHROMIUM) -> None:
        self.user_data_dir = user_data_dir
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        """Start the browser (once) and wait until it tells its DevTools port. A missing
        binary fails the calling test: the suite needs it, ``scripts/test`` installs it."""
        if self.proc is not None:
            return
        if not (os.access(self.binary, os.X_OK) or shutil.which(self.binary)):
            pytest.fail(
                f"{self.binary} is missing: run scripts/test, which installs chromium "
                "(or: apt-get install -y chromium)",
                pytrace=False,
            )
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        active_port = self.user_data_dir / "DevToolsActivePort"
        active_port.unlink(missing_ok=True)
        self.stderr_path = self.user_data_dir.parent / "chromium.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [self.binary, *FLAGS, f"--user-data-dir={self.user_data_dir}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group, so kill() takes the helpers
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            lines = active_port.read_text().split() if active_port.exists() else []
            if lines and lines[0].isdigit():
                self.port = int(lines[0])
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"chromium did not open DevTools in {START_TIMEOUT} s: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """Stop the browser (SIGTERM, so that it reaps its helpers, for up to 5 s), then
        SIGKILL whatever is left of its process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    @contextlib.asynccontextmanager
    async def page(self, timeout: float = CALL_TIMEOUT) -> AsyncIterator[Page]:
        """A new tab, closed on exit."""
        self.start()
        endpoint = f"http://127.0.0.1:{self.port}"
        async with httpx.AsyncClient(base_url=endpoint, timeout=timeout, trust_env=False) as http:
            response = await http.put("/json/new?about:blank")
            response.raise_for_status()
            target = response.json()
            ws = await connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
            page = Page(ws)
            try:
                yield page
            finally:
                await page.close()
                with contextlib.suppress(httpx.HTTPError):
                    await http.get(f"/json/close/{target['id']}")
