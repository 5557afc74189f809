"""Subscribers that stop reading, on raw sockets, and how their connection ended.

Each :class:`Stalled` subscriber opens its connection with a small receive buffer, subscribes,
and then reads nothing until :meth:`Stalled.read_to_end`, which reads everything the hub sent
until the hub closes the connection. :meth:`Stalled.outcome` then parses those bytes with a
parser that is not the hub's own where one exists (h11 for HTTP, the websockets library for
WebSocket frames; the TCP protocol has only ours) and says which messages arrived whole and
what the last thing on the connection was.
"""

from __future__ import annotations

import json
import os
import socket
from base64 import b64encode
from collections.abc import Generator
from dataclasses import dataclass

import h11
from websockets.exceptions import ProtocolError as WebSocketProtocolError
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from backchannel.wire import format_id
from backchannel.wire import frames as f
from backchannel.wire.sse import EventParser

RECEIVE_BUFFER = 4096
HEAD_END = b"\r\n\r\n"


@dataclass
class Outcome:
    ids: list[str]  # messages received whole, in order
    ending: str  # what ended the connection, e.g. "close 4008 'slow consumer'"


class Stalled:
    transport = ""

    def __init__(self, host: str, port: int, channel: str) -> None:
        self.host = host
        self.port = port
        self.channel = channel
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.sock.settimeout(30)
        self.received = bytearray()

    def open(self) -> Stalled:
        self.sock.connect((self.host, self.port))
        self.subscribe()
        return self

    def subscribe(self) -> None:
        raise NotImplementedError

    #: The bytes the hub's goodbye ends with, on this transport.
    goodbye = b""

    def read_to_end(self, *, until_goodbye: bool = False, timeout: float = 120) -> None:
        """Read until the hub closes the connection, or, with ``until_goodbye``, until what was
        read ends with the transport's goodbye (through ASGI, the server then waits for the
        client's close frame, or keeps the HTTP connection alive; a real client would answer
        or reconnect). ``timeout`` guards against a hang."""
        self.sock.settimeout(timeout)
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return
            if not chunk:
                return
            self.received += chunk
            if until_goodbye and self.received.endswith(self.goodbye):
                return

    def outcome(self) -> Outcome:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()

    def _read_head(self) -> bytes:
        """Read up to the end of an HTTP response head, leaving what follows it buffered."""
        while HEAD_END not in self.received:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed before a response head: {bytes(self.received)!r}")
            self.received += chunk
        end = self.received.index(HEAD_END) + len(HEAD_END)
        head = bytes(self.received[:end])
        del self.received[:end]
        return head


class StalledSSE(Stalled):
    transport = "sse"
    goodbye = b"0\r\n\r\n"  # the last chunk of the body

    def subscribe(self) -> None:
        self.http = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=f"/v1/channels/{self.channel}/events",
            headers=[("host", f"{self.host}:{self.port}"), ("accept", "text/event-stream")],
        )
        self.sock.sendall(self.http.send(request) + self.http.send(h11.EndOfMessage()))

    def outcome(self) -> Outcome:
        self.http.receive_data(bytes(self.received))
        self.http.receive_data(b"")
        parser = EventParser()
        ending = "dropped before the response head"
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                ending = f"dropped mid-body ({exc})"
                break
            if isinstance(event, h11.Response):
                assert event.status_code == 200, event
                ending = "dropped mid-body"
            elif isinstance(event, h11.Data):
                parser.receive_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                ending = "end of stream"
            else:  # the connection closed, or nothing more to parse
                break
        ids = [json.loads(e.data)["id"] for e in parser.events() if e.data]
        return Outcome(ids, ending)


class StalledWS(Stalled):
    transport = "ws"
    path = "/v1/channels/{channel}/ws"
    goodbye = Frame(Opcode.CLOSE, Close(4008, "slow consumer").serialize()).serialize(
        mask=False, extensions=[]
    )

    def subscribe(self) -> None:
        key = b64encode(os.urandom(16)).decode()
        path = self.path.format(channel=self.channel)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = self._read_head()
        assert head.startswith(b"HTTP/1.1 101"), head

    def frames(self) -> tuple[list[Frame], str]:
        reader = StreamReader()
        reader.feed_data(bytes(self.received))
        reader.feed_eof()
        frames: list[Frame] = []
        while True:
            parser: Generator[None, None, Frame] = Frame.parse(
                reader.read_exact, mask=False, max_size=None, extensions=[]
            )
            try:
                next(parser)
            except StopIteration as done:
                frames.append(done.value)
                continue
            except (EOFError, WebSocketProtocolError):
                pass
            return frames, "dropped mid-frame" if reader.buffer else "dropped"

    def payloads(self, frames: list[Frame]) -> list[dict[str, object]]:
        return [json.loads(frame.data) for frame in frames if frame.opcode is Opcode.TEXT]

    def outcome(self) -> Outcome:
        frames, ending = self.frames()
        if frames and frames[-1].opcode is Opcode.CLOSE:
            close = Close.parse(frames[-1].data)
            ending = f"close {close.code} {close.reason!r}"
        return Outcome([str(p["id"]) for p in self.payloads(frames)], ending)


class StalledMux(StalledWS):
    transport = "mux"
    path = "/v1/ws"

    def subscribe(self) -> None:
        super().subscribe()
        command = json.dumps({"op": "subscribe", "id": 1, "channel": self.channel}).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(command))
        assert len(command) < 126
        self.sock.sendall(bytes([0x81, 0x80 | len(command)]) + mask + masked)

    def outcome(self) -> Outcome:
        frames, ending = self.frames()
        if frames and frames[-1].opcode is Opcode.CLOSE:
            close = Close.parse(frames[-1].data)
            ending = f"close {close.code} {close.reason!r}"
        payloads = self.payloads(frames)
        assert payloads and payloads[0] == {"op": "ok", "id": 1}, payloads[:1]
        ids = []
        for payload in payloads[1:]:
            assert payload["op"] == "message", payload
            message = payload["message"]
            assert isinstance(message, dict)
            ids.append(str(message["id"]))
        return Outcome(ids, ending)


class StalledTCP(Stalled):
    transport = "tcp"
    goodbye = f.encode(
        f.Error(request=0, type="slow-consumer", detail="fell more than max_outbound_bytes behind")
    )

    def subscribe(self) -> None:
        self.codec = f.Connection(f.Role.CLIENT)
        self.sock.sendall(self.codec.send(f.Hello(versions=(1,))))
        self.sock.sendall(f.encode(f.Subscribe(request=1, channel=self.channel, after=None)))

    def outcome(self) -> Outcome:
        codec = self.codec
        codec.receive_data(bytes(self.received))
        codec.receive_data(b"")
        ids: list[str] = []
        while True:
            try:
                event = codec.next_event()
            except f.RemoteProtocolError as exc:
                return Outcome(ids, f"dropped ({exc})")
            if isinstance(event, f.Message):
                ids.append(format_id(event.seq))
            elif isinstance(event, f.Error):
                ending = f"error {event.request} {event.type}"
                following = codec.next_event()
                assert following is f.CONNECTION_CLOSED, following
                return Outcome(ids, ending)
            elif event is f.CONNECTION_CLOSED:
                return Outcome(ids, "closed without an error frame")
            else:
                assert isinstance(event, f.Welcome | f.Ok), event


STALLED: dict[str, type[Stalled]] = {
    c.transport: c for c in (StalledSSE, StalledWS, StalledMux, StalledTCP)
}
