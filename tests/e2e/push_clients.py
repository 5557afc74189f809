"""Minimal subscribers for every push transport, for the behaviour suite. Each yields the
messages it receives as ``(id, text)`` pairs, where text is the published text body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import websockets

from backchannel.wire import format_id
from backchannel.wire import frames as f
from backchannel.wire.sse import EventParser

Received = tuple[str, str]


class PushClient:
    transport = ""

    def __init__(self, base_url: str, tcp_port: int) -> None:
        self.base_url = base_url
        self.ws_url = "ws" + base_url[len("http") :]
        self.tcp_port = tcp_port
        self.ended: str | None = None  # how the server ended the subscription, if it did

    async def connect(self, channel: str, after: str | None = None) -> None:
        raise NotImplementedError

    def messages(self) -> AsyncIterator[Received]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def take(self, count: int, timeout: float = 20) -> list[Received]:
        out: list[Received] = []
        iterator = self.messages()
        async with asyncio.timeout(timeout):
            while len(out) < count:
                try:
                    out.append(await anext(iterator))
                except StopAsyncIteration:
                    break
        return out


class SSEClient(PushClient):
    transport = "sse"

    async def connect(self, channel: str, after: str | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=None)
        headers = {"last-event-id": after} if after else {}
        request = self.http.build_request("GET", f"/v1/channels/{channel}/events", headers=headers)
        self.response = await self.http.send(request, stream=True)
        assert self.response.status_code == 200, await self.response.aread()
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self.parser = EventParser()
        self.chunks = self.response.aiter_raw()
        self.retries = 0

    async def messages(self) -> AsyncIterator[Received]:
        while True:
            for event in self.parser.events():
                message = json.loads(event.data)
                assert event.id == message["id"]
                yield message["id"], message["data"]
            try:
                chunk = await anext(self.chunks)
            except (StopAsyncIteration, httpx.HTTPError):
                self.ended = "stream ended"
                return
            self.retries += chunk.count(b"retry:")
            self.parser.receive_data(chunk)

    async def close(self) -> None:
        await self.response.aclose()
        await self.http.aclose()


class WSClient(PushClient):
    transport = "ws"

    async def connect(self, channel: str, after: str | None = None) -> None:
        query = f"?after={after}" if after else ""
        self.socket = await websockets.connect(f"{self.ws_url}/v1/channels/{channel}/ws{query}")

    async def messages(self) -> AsyncIterator[Received]:
        while True:
            try:
                message = json.loads(await self.socket.recv())
            except websockets.ConnectionClosed as exc:
                self.ended = f"close {exc.rcvd.code if exc.rcvd else None}"
                return
            yield message["id"], message["data"]

    async def close(self) -> None:
        await self.socket.close()


class MuxClient(PushClient):
    transport = "mux"

    async def connect(self, channel: str, after: str | None = None) -> None:
        self.socket = await websockets.connect(f"{self.ws_url}/v1/ws")
        command: dict[str, Any] = {"op": "subscribe", "id": 1, "channel": channel}
        if after:
            command["after"] = after
        await self.socket.send(json.dumps(command))
        answer = json.loads(await self.socket.recv())
        assert answer == {"op": "ok", "id": 1}, answer

    async def messages(self) -> AsyncIterator[Received]:
        while True:
            try:
                frame = json.loads(await self.socket.recv())
            except websockets.ConnectionClosed as exc:
                self.ended = f"close {exc.rcvd.code if exc.rcvd else None}"
                return
            assert frame["op"] == "message", frame
            yield frame["message"]["id"], frame["message"]["data"]

    async def close(self) -> None:
        await self.socket.close()


class TCPClient(PushClient):
    transport = "tcp"

    async def connect(self, channel: str, after: str | None = None) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.tcp_port)
        self.codec = f.Connection(f.Role.CLIENT)
        self.writer.write(self.codec.send(f.Hello(versions=(1,))))
        assert isinstance(await self._next(), f.Welcome)
        after_seq = int(after, 16) if after else None
        self.writer.write(self.codec.send(f.Subscribe(request=1, channel=channel, after=after_seq)))
        assert await self._next() == f.Ok(request=1)

    async def _next(self) -> f.Event:
        while True:
            event = self.codec.next_event()
            if event is not f.NEED_DATA:
                return event
            self.codec.receive_data(await self.reader.read(65536))

    async def messages(self) -> AsyncIterator[Received]:
        while True:
            try:
                event = await self._next()
            except (ConnectionError, f.RemoteProtocolError):
                self.ended = "connection lost"
                return
            if isinstance(event, f.Error):
                self.ended = event.type
                return
            if event is f.CONNECTION_CLOSED:
                self.ended = "closed"
                return
            assert isinstance(event, f.Message), event
            yield format_id(event.seq), event.data.decode()

    async def close(self) -> None:
        self.writer.close()


CLIENTS: dict[str, type[PushClient]] = {
    c.transport: c for c in (SSEClient, WSClient, MuxClient, TCPClient)
}
