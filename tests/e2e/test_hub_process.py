"""End to end against a real ``backchannel serve`` process and its SQLite files."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import HubProcess, on_every_store

pytestmark = pytest.mark.e2e
MESSAGES = "/v1/channels/news/messages"


def poll_all(client: httpx.Client, path: str = MESSAGES) -> list[dict[str, object]]:
    messages: list[dict[str, object]] = []
    after = "0"
    while True:
        page = client.get(path, params={"after": after, "limit": 1000}).json()
        if not page["messages"]:
            return messages
        messages += page["messages"]
        after = page["next_after"]


@on_every_store
def test_publish_then_poll(hub: HubProcess) -> None:
    with hub.client() as c:
        ids = [c.post(MESSAGES, json={"n": i}).json()["id"] for i in range(3)]
        page = c.get(MESSAGES).json()
    assert [m["id"] for m in page["messages"]] == ids
    assert [m["data"] for m in page["messages"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert page["next_after"] == ids[-1]


@on_every_store
def test_long_poll_released_by_a_publish(hub: HubProcess) -> None:
    with hub.client() as c:
        result: dict[str, object] = {}

        def wait() -> None:
            result["page"] = c.get(MESSAGES, params={"wait": 30}).json()

        waiter = threading.Thread(target=wait)
        waiter.start()
        for _ in range(500):  # until the hub counts the waiter
            if c.get("/v1/channels/news").json()["subscribers"].get("longpoll") == 1:
                break
            time.sleep(0.01)
        published = c.post(MESSAGES, content=b"wake up", headers={"content-type": "text/plain"})
        waiter.join(10)
        assert not waiter.is_alive(), "the long poll was not released by the publish"
    page = result["page"]
    assert isinstance(page, dict)
    assert [(m["id"], m["data"]) for m in page["messages"]] == [(published.json()["id"], "wake up")]


def test_long_poll_times_out_empty(hub: HubProcess) -> None:
    with hub.client() as c:
        c.post(MESSAGES, json=1)
        response = c.get(MESSAGES, params={"after": "1", "wait": "0.3"})
    assert response.status_code == 200
    assert response.json() == {"messages": [], "next_after": "0000000000000001"}


def test_restart_keeps_ids_and_history(hub: HubProcess) -> None:
    with hub.client() as c:
        before = [c.post(MESSAGES, json=i).json()["id"] for i in range(5)]
        c.put("/v1/channels/news", json={"retention": {"max_count": 100}})
    assert hub.terminate() == 0
    hub.start()
    with hub.client() as c:
        assert [m["id"] for m in poll_all(c)] == before
        after = c.post(MESSAGES, json=5).json()["id"]
        assert c.get("/v1/channels/news").json()["retention"]["max_count"] == 100
    assert after > before[-1]
    assert int(after, 16) == int(before[-1], 16) + 1


@on_every_store
def test_kill_9_after_acknowledged_publishes_loses_nothing(hub: HubProcess) -> None:
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()

    def publisher(worker: int) -> None:
        with hub.client() as c:
            for i in range(40):
                body = f"w{worker}-{i}".encode()
                response = c.post(MESSAGES, content=body, headers={"content-type": "text/plain"})
                assert response.status_code == 201
                with lock:
                    acknowledged[response.json()["id"]] = body

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(publisher, range(8)))
    hub.kill()  # right after the last acknowledgement: no shutdown code runs
    hub.start()
    with hub.client() as c:
        stored = {m["id"]: str(m["data"]).encode() for m in poll_all(c)}
    assert len(acknowledged) == 320
    assert stored == acknowledged


def test_kill_9_during_publishing_keeps_every_acknowledged_message(hub: HubProcess) -> None:
    acknowledged: dict[str, str] = {}
    stop = threading.Event()

    def publisher(worker: int) -> None:
        with hub.client() as c:
            i = 0
            while not stop.is_set():
                try:
                    response = c.post(MESSAGES, json=f"{worker}-{i}")
                except httpx.TransportError:
                    return
                if response.status_code == 201:
                    acknowledged[response.json()["id"]] = f"{worker}-{i}"
                i += 1

    threads = [threading.Thread(target=publisher, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(acknowledged) < 200:
        time.sleep(0.01)
    hub.kill()
    stop.set()
    for t in threads:
        t.join(10)
    hub.start()
    with hub.client() as c:
        stored = {m["id"]: m["data"] for m in poll_all(c)}
    missing = {k: v for k, v in acknowledged.items() if stored.get(k) != v}
    assert not missing
    # Ids stay dense: whatever was stored but not acknowledged still has its own id.
    assert sorted(stored) == [f"{i:016x}" for i in range(1, len(stored) + 1)]


def test_limits_over_real_http(hub_factory: type[HubProcess]) -> None:
    hub = hub_factory(
        "--max-message-bytes",
        "100",
        "--max-limit",
        "10",
        "--default-limit",
        "5",
        "--max-wait",
        "2",
        "--max-long-polls",
        "1",
    ).start()
    with hub.client() as c:
        big = c.post(MESSAGES, content=b"x" * 101)
        assert (big.status_code, big.json()["type"]) == (413, "/problems/message-too-large")
        assert big.headers["content-type"] == "application/problem+json"
        assert c.post(MESSAGES, content=b"x" * 100).status_code == 201
        cases = {
            "limit=11": (400, "limit-out-of-range"),
            "wait=3": (400, "wait-out-of-range"),
            "after=nope": (400, "invalid-cursor"),
        }
        for query, (status, slug) in cases.items():
            response = c.get(MESSAGES + "?" + query)
            assert (response.status_code, response.json()["type"]) == (status, f"/problems/{slug}")
        bad_json = c.post(MESSAGES, content=b"{", headers={"content-type": "application/json"})
        assert bad_json.json()["type"] == "/problems/malformed-json"

        def hold() -> None:
            with hub.client() as other:
                other.get("/v1/channels/quiet/messages", params={"wait": 2})

        holder = threading.Thread(target=hold)
        holder.start()
        for _ in range(300):
            if c.get("/v1/channels/quiet").json()["subscribers"].get("longpoll") == 1:
                break
            time.sleep(0.01)
        busy = c.get("/v1/channels/quiet/messages", params={"wait": 1})
        assert (busy.status_code, busy.json()["type"]) == (503, "/problems/too-busy")
        assert busy.headers["retry-after"] == "1"
        holder.join()
        assert len(c.get(MESSAGES).json()["messages"]) == 1


async def _raw_long_poll(
    host: str, port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


def test_listen_backlog_is_what_the_kernel_queues(hub_factory: type[HubProcess]) -> None:
    """``ss`` shows a listening socket's backlog as its Send-Q: both ports take the setting."""
    hub = hub_factory("--listen-backlog", "777").start()
    port = urlsplit(hub.url).port
    shown = subprocess.run(
        ["ss", "-Hltn", f"( sport = :{port} or sport = :{hub.tcp_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # State Recv-Q Send-Q Local-Address:Port Peer-Address:Port, once per socket.
    assert len(shown) == 10
    assert shown[2] == shown[7] == "777"


def test_a_thousand_long_polls_released_by_one_publish(hub: HubProcess) -> None:
    parts = urlsplit(hub.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    count = 1000

    async def scenario() -> list[bytes]:
        connections = await asyncio.gather(
            *(_raw_long_poll(host, port, MESSAGES + "?wait=60") for _ in range(count))
        )
        async with httpx.AsyncClient(base_url=hub.url, timeout=30) as c:
            for _ in range(1000):
                info = (await c.get("/v1/channels/news")).json()
                if info["subscribers"].get("longpoll") == count:
                    break
                await asyncio.sleep(0.02)
            assert info["subscribers"].get("longpoll") == count
            await c.post(MESSAGES, json={"hello": "everyone"})
        try:
            return list(
                await asyncio.wait_for(
                    asyncio.gather(*(reader.read() for reader, _ in connections)), 30
                )
            )
        finally:
            for _, writer in connections:
                writer.close()

    answers = asyncio.run(scenario())
    bodies = [json.loads(raw.split(b"\r\n\r\n", 1)[1]) for raw in answers]
    assert len(bodies) == count
    assert all(b["messages"][0]["data"] == {"hello": "everyone"} for b in bodies)
    assert all(len(b["messages"]) == 1 for b in bodies)


def test_sigterm_answers_long_polls_and_exits(hub: HubProcess) -> None:
    result: dict[str, object] = {}

    def wait() -> None:
        with hub.client() as c:
            result["response"] = c.get(MESSAGES, params={"wait": 60})

    waiter = threading.Thread(target=wait)
    waiter.start()
    with hub.client() as c:
        for _ in range(300):
            if c.get("/v1/channels/news").json()["subscribers"].get("longpoll") == 1:
                break
            time.sleep(0.01)
    began = time.monotonic()
    assert hub.terminate(timeout=30) == 0
    took = time.monotonic() - began
    waiter.join(5)
    response = result["response"]
    assert isinstance(response, httpx.Response)
    assert response.json()["messages"] == []
    # Generous bound, far below the 60 s wait: shutdown must not hold the long poll.
    assert took < 20


def test_second_hub_on_the_same_data_dir_refuses_to_start(
    hub: HubProcess, hub_factory: type[HubProcess]
) -> None:
    second = hub_factory(data_dir=hub.data_dir)
    with pytest.raises(RuntimeError, match="in use by pid"):
        second.start()


def test_bad_configuration_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backchannel", "serve", "--max-limit", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "max_limit must be positive" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "backchannel", "serve", "--store", "postgres://x"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "unknown store" in done.stderr


def cli(
    hub_url: str | None, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    url = ["--url", hub_url] if hub_url else []
    return subprocess.run(
        [sys.executable, "-m", "backchannel", *args, *url],
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_publish_and_poll(hub: HubProcess) -> None:
    first = cli(hub.url, "publish", "news", "hello")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["id"] == "0000000000000001"
    assert cli(hub.url, "publish", "news", '{"n": 2}', "--json").returncode == 0
    assert (
        cli(
            hub.url, "publish", "news", "-", "--content-type", "text/csv", stdin=b"a,b\n1,2\n"
        ).returncode
        == 0
    )
    polled = cli(hub.url, "poll", "news", "--after", "1")
    assert polled.returncode == 0, polled.stderr
    page = json.loads(polled.stdout)
    assert [m["data"] for m in page["messages"]] == [{"n": 2}, "a,b\n1,2\n"]
    waited = cli(hub.url, "poll", "news", "--after", page["next_after"], "--wait", "0.2")
    assert json.loads(waited.stdout)["messages"] == []
    refused = cli(hub.url, "publish", "news", "{", "--json")
    assert refused.returncode == 1
    assert "Malformed JSON" in refused.stderr


def test_cli_says_when_the_hub_is_unreachable() -> None:
    done = cli("http://127.0.0.1:9", "poll", "news")
    assert done.returncode == 2
    assert "cannot reach the hub" in done.stderr


def test_curl_as_documented(hub: HubProcess) -> None:
    def curl(*args: str) -> str:
        return subprocess.run(
            ["curl", "-sS", *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout

    base = hub.url + MESSAGES
    published = json.loads(
        curl("-X", "POST", base, "-H", "Content-Type: application/json", "-d", '{"text": "hi"}')
    )
    assert published["id"] == "0000000000000001"
    page = json.loads(curl(base + "?after=0"))
    assert page["messages"][0]["data"] == {"text": "hi"}
    waiter = subprocess.Popen(
        ["curl", "-sS", f"{base}?after={page['next_after']}&wait=30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    curl("-X", "POST", base, "-d", "second")
    out, _ = waiter.communicate(timeout=20)
    assert [m["data"] for m in json.loads(out)["messages"]] == ["second"]
