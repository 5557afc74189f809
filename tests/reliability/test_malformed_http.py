"""Malformed and hostile HTTP against a real hub process, over raw sockets: every one gets a
problem document (or a closed connection) and the hub goes on serving.

Covered: garbage request lines, invalid header bytes, bad chunked encoding, an oversized
request line and headers (431), oversized bodies with Content-Length and chunked (413),
slow-loris clients (408 after ``header_timeout``), and connections past ``max_connections``
(503 with Retry-After; TCP: an ERROR frame), up to and past the process's file limit.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import HubProcess

pytestmark = pytest.mark.e2e

#: No assertion is about time: this only stops a broken test from hanging.
SOCKET_TIMEOUT = 30.0
HEADER_TIMEOUT = "1"
MAX_MESSAGE = 4096


def address(hub: HubProcess) -> tuple[str, int]:
    parts = urlsplit(hub.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def exchange(hub: HubProcess, data: bytes) -> bytes:
    """Send ``data``, then read until the hub closes the connection."""
    with socket.create_connection(address(hub), timeout=SOCKET_TIMEOUT) as sock:
        with contextlib.suppress(OSError):  # the hub may close before it has read everything
            sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_problem(response: bytes, status: int, slug: str) -> dict[str, str]:
    assert response, "the hub closed the connection without an answer"
    got, headers, body = parse(response)
    assert got == status, response[:500]
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    document = json.loads(body[: int(headers["content-length"])])
    assert document["type"] == f"/problems/{slug}" and document["status"] == status
    assert document["detail"]
    return headers


def assert_serving(hub: HubProcess) -> None:
    assert hub.proc is not None and hub.proc.poll() is None, hub.stderr()
    with hub.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.post("/v1/channels/after/messages", content=b"x").status_code == 201
    assert "Traceback" not in hub.stderr()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    folder = tmp_path_factory.mktemp("malformed")
    process = HubProcess(
        folder / "data",
        folder,
        "--header-timeout",
        HEADER_TIMEOUT,
        "--max-message-bytes",
        str(MAX_MESSAGE),
    ).start()
    yield process
    assert_serving(process)
    process.stop()


GET = b"GET /healthz HTTP/1.1\r\nHost: hub\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: hub\r\n\r\n",
        b"GET /healthz HTTTP/1.1\r\nHost: hub\r\n\r\n",
        b"GET /heal thz HTTP/1.1\r\nHost: hub\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"\xff\xfe GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["word", "binary", "no-target", "version", "protocol", "space", "control", "bom"],
)
def test_garbage_request_lines(hub: HubProcess, request_bytes: bytes) -> None:
    assert_problem(exchange(hub, request_bytes), 400, "malformed-request")


@pytest.mark.parametrize(
    "header",
    [
        b"Bad Header: a\r\n",
        b"X-\x01: a\r\n",
        b"X-A: a\x00b\r\n",
        b"X-A: a\x7fb\r\n",
        b"no colon at all\r\n",
        b": no name\r\n",
        b"X-\xff: a\r\n",
        b"Content-Length: 1\r\nContent-Length: 2\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=[
        "space-in-name",
        "control-in-name",
        "nul-in-value",
        "del-in-value",
        "no-colon",
        "no-name",
        "byte-in-name",
        "two-lengths",
        "negative-length",
        "length-and-chunked",
    ],
)
def test_invalid_header_bytes(hub: HubProcess, header: bytes) -> None:
    assert_problem(exchange(hub, GET + header + b"\r\n"), 400, "malformed-request")


PUBLISH_CHUNKED = (
    b"POST /v1/channels/chunks/messages HTTP/1.1\r\nHost: hub\r\n"
    b"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",
        b"3\r\nabcdef\r\n0\r\n\r\n",
        b"3\r\nabc0\r\n\r\n",
        b"-1\r\nabc\r\n0\r\n\r\n",
        b"ffffffffffffffffffff\r\nabc\r\n",
        b"3 ; ext=\x00\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\n0\n\n\x01",
    ],
    ids=["not-hex", "longer", "no-crlf", "negative", "overflow", "bad-extension", "bare-lf"],
)
def test_bad_chunked_encoding(hub: HubProcess, body: bytes) -> None:
    assert_problem(exchange(hub, PUBLISH_CHUNKED + body), 400, "malformed-request")


def test_good_chunked_publish_for_comparison(hub: HubProcess) -> None:
    response = exchange(
        hub,
        PUBLISH_CHUNKED.replace(b"1.1\r\n", b"1.1\r\nConnection: close\r\n", 1)
        + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert parse(response)[0] == 201, response
    with hub.client() as client:
        messages = client.get("/v1/channels/chunks/messages?after=0").json()["messages"]
    assert [m["data"] for m in messages] == ["abcde"]


def test_oversized_request_line(hub: HubProcess) -> None:
    response = exchange(hub, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: hub\r\n\r\n")
    assert_problem(response, 431, "request-head-too-large")


def test_oversized_header(hub: HubProcess) -> None:
    response = exchange(hub, GET + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert_problem(response, 431, "request-head-too-large")


def test_many_headers_past_the_limit(hub: HubProcess) -> None:
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(200))
    assert_problem(exchange(hub, GET + headers + b"\r\n"), 431, "request-head-too-large")


def test_headers_just_under_the_limit_pass(hub: HubProcess) -> None:
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(150))  # ~15 KiB
    response = exchange(hub, GET + b"Connection: close\r\n" + headers + b"\r\n")
    assert parse(response)[0] == 200, response[:300]


def test_a_head_that_never_ends_is_cut(hub: HubProcess) -> None:
    """One header line sent in pieces with no end: refused once past the limit (plus one
    read), without waiting for the line to finish."""
    with socket.create_connection(address(hub), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(GET + b"X-Endless: ")
        with contextlib.suppress(OSError):
            for _ in range(40):
                sock.sendall(b"a" * 16_384)
        response = read_all(sock)
    assert_problem(response, 431, "request-head-too-large")


def test_oversized_body_with_content_length(hub: HubProcess) -> None:
    body = b"x" * (MAX_MESSAGE + 1)
    response = exchange(
        hub,
        b"POST /v1/channels/big/messages HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
    )
    status, headers, _ = parse(response)
    assert status == 413 and headers["content-type"] == "application/problem+json"


def test_oversized_body_chunked(hub: HubProcess) -> None:
    """A chunked upload declares no length: the hub counts as it reads and answers 413 once
    the body passes max_message_bytes, and reads and drops the rest."""
    chunks = b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(3 * MAX_MESSAGE // 1024))
    response = exchange(
        hub,
        b"POST /v1/channels/big/messages HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
        + chunks
        + b"0\r\n\r\n",
    )
    status, headers, body = parse(response)
    assert status == 413 and headers["content-type"] == "application/problem+json"
    assert json.loads(body)["type"] == "/problems/message-too-large"
    with hub.client() as client:
        assert client.get("/v1/channels/big/messages?after=0").json()["messages"] == []


def test_slow_loris_is_closed_after_the_header_timeout(hub: HubProcess) -> None:
    """A client that sends its headers a byte at a time, too slowly to finish: 408, closed."""
    request = GET + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"
    received = b""
    with socket.create_connection(address(hub), timeout=SOCKET_TIMEOUT) as sock:
        sent = 0
        with contextlib.suppress(OSError):
            for byte in request:
                sock.sendall(bytes([byte]))
                sent += 1
                # Stop as soon as the hub has answered (it closes the connection).
                sock.settimeout(0.1)
                with contextlib.suppress(TimeoutError):
                    received = sock.recv(65536)
                    if received:
                        break
        sock.settimeout(SOCKET_TIMEOUT)
        received += read_all(sock)
    assert sent < len(request), "the whole request went through: no timeout happened"
    assert_problem(received, 408, "request-timeout")


def test_a_connection_that_sends_nothing_is_closed(hub: HubProcess) -> None:
    with socket.create_connection(address(hub), timeout=SOCKET_TIMEOUT) as sock:
        assert_problem(read_all(sock), 408, "request-timeout")


def test_the_timeout_does_not_cut_a_long_poll(hub: HubProcess) -> None:
    """header_timeout covers the head only: a request waiting for its answer longer than that
    is untouched."""
    with hub.client() as client:
        response = client.get("/v1/channels/quiet/messages", params={"wait": "2"})
    assert response.status_code == 200 and response.json()["messages"] == []


def test_tcp_client_without_hello_is_closed(hub: HubProcess) -> None:
    with socket.create_connection((address(hub)[0], hub.tcp_port), timeout=SOCKET_TIMEOUT) as sock:
        frame = read_all(sock)
    assert error_frame_type(frame) == "request-timeout"


def error_frame_type(frame: bytes) -> str:
    """The problem slug of a TCP ERROR frame (docs/protocol.md)."""
    assert len(frame) > 11, frame
    (length,) = struct.unpack("!I", frame[:4])
    assert frame[4] == 0x86 and len(frame) == 4 + length, frame
    (request,) = struct.unpack("!I", frame[5:9])
    assert request == 0
    (size,) = struct.unpack("!H", frame[9:11])
    return frame[11 : 11 + size].decode()


# -- many connections ----------------------------------------------------------------------------

FILE_LIMIT = 256
HEADROOM = 128  # backchannel.server.limits.HEADROOM


class LimitedHub(HubProcess):
    wrapper = ("prlimit", f"--nofile={FILE_LIMIT}")


@pytest.fixture
def limited_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    if shutil.which("prlimit") is None:
        pytest.fail("prlimit is missing: apt-get install util-linux")
    folder = tmp_path_factory.mktemp("limited")
    # A long header timeout: idle connections stay until the test closes them.
    process = LimitedHub(folder / "data", folder, "--header-timeout", "120").start()
    yield process
    process.stop()


def probe(hub: HubProcess) -> bytes:
    return exchange(hub, GET + b"Connection: close\r\n\r\n")


def test_idle_connections_up_to_the_file_limit(limited_hub: HubProcess) -> None:
    """Under a 256-file limit the hub allows 256 - 128 connections. Idle connections fill that;
    past it, even past the file limit itself, new ones are refused with a 503 problem (TCP: an
    ERROR frame) and the hub's own files keep working; once the idle ones go, it serves again."""
    hub = limited_hub
    allowed = FILE_LIMIT - HEADROOM
    idle = [socket.create_connection(address(hub), timeout=SOCKET_TIMEOUT) for _ in range(allowed)]
    try:
        # The hub accepts them in its own time: probe until it refuses (each probe is one more).
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while parse(response := probe(hub))[0] == 200:
            assert time.monotonic() < deadline, "the hub never refused a connection"
        headers = assert_problem(response, 503, "too-many-connections")
        assert headers["retry-after"] == "1"
        tcp = socket.create_connection((address(hub)[0], hub.tcp_port), timeout=SOCKET_TIMEOUT)
        with tcp:
            assert error_frame_type(read_all(tcp)) == "too-many-connections"
        # Past the file limit itself: the hub refuses or resets them, and keeps its files.
        flood = []
        for _ in range(FILE_LIMIT):
            with contextlib.suppress(OSError):
                flood.append(socket.create_connection(address(hub), timeout=SOCKET_TIMEOUT))
        for sock in flood:
            sock.close()
        assert_problem(probe(hub), 503, "too-many-connections")
        with hub.client() as client:  # refused too, but the hub's store is fine (below)
            assert client.get("/readyz").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while parse(probe(hub))[0] != 200:
        assert time.monotonic() < deadline, "the hub did not serve again"
        time.sleep(0.05)
    assert_serving(hub)
    log = hub.stderr()
    assert "refusing connections" in log
    assert "Too many open files" not in log and "unable to open" not in log


def test_event_streams_count_toward_the_connection_limit(hub_factory: type[HubProcess]) -> None:
    """A started event stream leaves uvicorn's books (server/fastpath.py take_over); the limit
    must still count it, or streams could exhaust the process's files."""
    hub = hub_factory("--max-connections", "10", "--no-tcp").start()
    streams = []
    try:
        for _ in range(10):
            sock = socket.create_connection(address(hub), timeout=SOCKET_TIMEOUT)
            sock.sendall(b"GET /v1/channels/limited/events HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200"), head
            streams.append(sock)
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while parse(response := probe(hub))[0] == 200:  # the last stream may still be closing
            assert time.monotonic() < deadline, "streams were not counted"
            time.sleep(0.05)
        assert_problem(response, 503, "too-many-connections")
    finally:
        for sock in streams:
            sock.close()
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while parse(probe(hub))[0] != 200:
        assert time.monotonic() < deadline, "the hub did not serve again"
        time.sleep(0.05)
