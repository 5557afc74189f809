"""A real browser's ``EventSource`` against a real hub: headless Chromium over CDP, on a page
served from another origin (another port), as a web app would use the hub."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from .browser import Chromium, Page
from .conftest import HubProcess

pytestmark = pytest.mark.e2e

# Records every event: messages as {id, data} in `events`, `open`/`error` in `states`.
PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>backchannel EventSource test</title>
<script>
window.events = [];
window.states = [];
window.start = (url) => {
  const source = new EventSource(url);
  window.source = source;
  source.onopen = () => states.push({type: "open", readyState: source.readyState});
  source.onerror = () => states.push({type: "error", readyState: source.readyState});
  source.onmessage = (e) => events.push({id: e.lastEventId, data: JSON.parse(e.data)});
};
</script>
"""
EVENTS = "/v1/channels/news/events"
# What conftest's ``hub_factory`` fixture gives: ``hub_factory(*serve_args).start()``.
HubFactory = Callable[..., HubProcess]


class PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGE if self.path == "/" else b"not found"
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """One browser for the module, started by the first test that opens a page."""
    browser = Chromium(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield browser
    finally:
        browser.kill()


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The origin of a tiny web server for the test page, on a port of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def publish(hub: HubProcess, texts: list[str]) -> list[str]:
    ids = []
    with httpx.Client(base_url=hub.url, timeout=10, trust_env=False) as http:
        for text in texts:
            response = http.post(
                "/v1/channels/news/messages",
                content=text.encode(),
                headers={"content-type": "text/plain"},
            )
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    return ids


async def sse_subscribers(hub: HubProcess) -> int:
    async with httpx.AsyncClient(base_url=hub.url, timeout=5, trust_env=False) as http:
        info = (await http.get("/v1/channels/news")).json()
    return int(info["subscribers"].get("sse", 0))


async def wait_subscribed(hub: HubProcess, page: Page, timeout: float = 10) -> None:
    """Until the page's EventSource is open and the hub counts it."""
    await page.wait_for(
        "window.source && window.source.readyState === EventSource.OPEN", timeout, what="open"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await sse_subscribers(hub) == 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the hub did not count the page's EventSource within {timeout} s")


def sent_headers(page: Page, url: str) -> list[dict[str, str]]:
    """The headers (lower-cased names) of each request the page sent to ``url``, in order.
    Chromium reports what it really sent in a separate event, tied by request id."""
    ids = [
        r["requestId"]
        for r in page.received("Network.requestWillBeSent")
        if r["request"]["url"] == url
    ]
    extra = {
        r["requestId"]: r["headers"] for r in page.received("Network.requestWillBeSentExtraInfo")
    }
    return [{k.lower(): v for k, v in extra.get(i, {}).items()} for i in ids]


async def wait_events(page: Page, count: int, timeout: float) -> list[dict[str, object]]:
    await page.wait_for(f"events.length >= {count}", timeout, what=f"{count} events")
    events: list[dict[str, object]] = await page.evaluate("events")
    return events


def messages(events: list[dict[str, object]]) -> list[tuple[object, object]]:
    """(lastEventId, text) of each event, after checking the event id matches the message's."""
    out = []
    for event in events:
        data = event["data"]
        assert isinstance(data, dict)
        assert data["id"] == event["id"] and data["channel"] == "news", event
        assert data["content_type"] == "text/plain", event
        out.append((event["id"], data["data"]))
    return out


async def test_live_messages_reach_a_cross_origin_event_source(
    chromium: Chromium, hub_factory: HubFactory, page_origin: str
) -> None:
    hub = hub_factory("--allowed-origins", page_origin).start()
    async with chromium.page() as page:
        await page.navigate(page_origin + "/")
        await page.evaluate(f"start({json.dumps(hub.url + EVENTS)})")
        await wait_subscribed(hub, page)
        texts = [f"live {n}" for n in range(20)]
        ids = publish(hub, texts)
        events = await wait_events(page, 20, timeout=10)
        await asyncio.sleep(0.2)  # time for anything extra to show up
        assert await page.evaluate("events.length") == 20
        states = await page.evaluate("states")
    assert messages(events) == list(zip(ids, texts, strict=True))
    assert states == [{"type": "open", "readyState": 1}]


async def test_browser_resumes_across_a_hub_restart(
    chromium: Chromium, hub_factory: HubFactory, page_origin: str
) -> None:
    port = free_port()
    args = ("--port", str(port), "--allowed-origins", page_origin)
    first = hub_factory(*args).start()  # the default SQLite store in the test's data dir
    async with chromium.page() as page:
        await page.navigate(page_origin + "/")
        await page.send("Network.enable")  # to see the headers of the browser's requests
        await page.evaluate(f"start({json.dumps(first.url + EVENTS)})")
        await wait_subscribed(first, page)
        texts = [f"before {n}" for n in range(5)]
        ids = publish(first, texts)
        await wait_events(page, 5, timeout=10)

        assert first.terminate() == 0  # the stream ends with `retry: 2000`
        await page.wait_for("states.some((s) => s.type === 'error')", 10, what="an error event")
        second = hub_factory(*args).start()
        assert second.url == first.url
        more = [f"after {n}" for n in range(5)]
        # Published before the browser is back (it waits 2 s), so they reach it only if it
        # resumes from its Last-Event-ID.
        ids += publish(second, more)
        texts += more
        await wait_events(page, 10, timeout=20)
        await wait_subscribed(second, page)
        await asyncio.sleep(0.3)  # time for a duplicate to show up
        events = await page.evaluate("events")
        states = await page.evaluate("states")
        requests = sent_headers(page, first.url + EVENTS)
    # The first request has no cursor; the reconnection (more than one if the hub was slow to
    # come back) carries the id of the last event the page got.
    assert len(requests) >= 2, requests
    assert all(r["accept"] == "text/event-stream" for r in requests), requests
    assert all(r["origin"] == page_origin for r in requests), requests
    assert "last-event-id" not in requests[0]
    assert all(r.get("last-event-id") == ids[4] for r in requests[1:]), requests
    assert messages(events) == list(zip(ids, texts, strict=True))
    # Open, error (the stream ended; readyState CONNECTING: the browser will retry), open.
    assert [s["type"] for s in states if s["type"] == "open"] == ["open", "open"], states
    assert all(s["readyState"] == 0 for s in states if s["type"] == "error"), states


async def test_event_source_from_an_origin_not_allowed_fails(
    chromium: Chromium, hub_factory: HubFactory, page_origin: str
) -> None:
    # Same port, other host name: another origin, so the page's own is not on the list.
    other = page_origin.replace("127.0.0.1", "localhost")
    hub = hub_factory("--allowed-origins", other).start()
    async with chromium.page() as page:
        await page.navigate(page_origin + "/")
        await page.evaluate(f"start({json.dumps(hub.url + EVENTS)})")
        await page.wait_for("states.length > 0", 10, what="an open or error event")
        publish(hub, ["not for this page"])
        await asyncio.sleep(0.5)  # time for a retry or a message to show up
        states = await page.evaluate("states")
        events = await page.evaluate("events")
        ready_state = await page.evaluate("source.readyState")
    assert states == [{"type": "error", "readyState": 2}]  # CLOSED: no retry after a CORS failure
    assert ready_state == 2
    assert events == []
