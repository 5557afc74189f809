"""The JWT matrix against real hub processes, on every transport.

Every transport below is tried with every case: the bad tokens of ``REFUSED`` (401 and the
problem slug), a valid token for another channel or queue (403), and valid tokens signed with
HS256, RS256 and ES256 (the action works: a message goes through, a job answers). A second hub
verifies with a JWKS file only. Then: streams end when their token expires, and ``serve``
refuses to listen on a non-loopback address without auth.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from backchannel.wire import frames as f
from backchannel.wire.sse import EventParser

from ..jwt_keys import AUDIENCE, EVERYTHING, ISSUER, REFUSED, Keys
from .conftest import HubProcess

pytestmark = pytest.mark.e2e

OK = (200, None)
FORBIDDEN = (403, "forbidden")
#: A valid token that grants everything, but on other names than the matrix uses.
ELSEWHERE = {
    "publish": ["elsewhere"],
    "subscribe": ["elsewhere"],
    "submit": ["elsewhere"],
    "claim": ["elsewhere"],
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


def _hub(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[HubProcess]:
    folder = tmp_path_factory.mktemp("hub")
    process = HubProcess(folder / "data", folder, *args)
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def hub(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    yield from _hub(
        tmp_path_factory,
        "--auth-secret-file",
        str(keys.secret_file),
        "--auth-public-keys",
        f"{keys.rsa_pem},{keys.ec_pem}",
        "--auth-audience",
        AUDIENCE,
        "--auth-issuer",
        ISSUER,
        "--sse-heartbeat",
        "0.5",
    )


@pytest.fixture(scope="module")
def jwks_hub(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    yield from _hub(tmp_path_factory, "--auth-jwks", str(keys.jwks))


def problem_slug(document: Any) -> str | None:
    if isinstance(document, dict) and isinstance(document.get("type"), str):
        return str(document["type"]).rsplit("/", 1)[-1]
    return None


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


Outcome = tuple[int, "str | None"]


@dataclass
class World:
    """What an attempt needs: the hub, an all-powerful token to set the stage, a fresh name."""

    hub: HubProcess
    admin: str
    name: str  # a channel and a queue the matrix tokens are granted ("ok.…")

    @property
    def ws_url(self) -> str:
        return "ws" + self.hub.url[len("http") :]

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.hub.url, timeout=20)

    async def publish(self, text: str = "hello") -> str:
        async with self.http() as http:
            response = await http.post(
                f"/v1/channels/{self.name}/messages",
                content=text.encode(),
                headers={"content-type": "text/plain", **bearer(self.admin)},
            )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def job(self, *, claimed: bool = False) -> tuple[str, str | None]:
        """A job of the world's queue (claimed: with its lease)."""
        async with self.http() as http:
            submitted = await http.post(
                f"/v1/queues/{self.name}/jobs", json={"n": 1}, headers=bearer(self.admin)
            )
            assert submitted.status_code == 202, submitted.text
            job_id = str(submitted.json()["id"])
            if not claimed:
                return job_id, None
            taken = await http.post(
                f"/v1/queues/{self.name}/claim", params={"wait": "0"}, headers=bearer(self.admin)
            )
            assert taken.status_code == 200, taken.text
            return job_id, str(taken.json()["lease"])


async def _http_outcome(response: httpx.Response, ok: int) -> Outcome:
    if response.status_code == ok:
        return OK
    if response.status_code == 401:
        assert response.headers["www-authenticate"].startswith('Bearer realm="backchannel"')
    return response.status_code, problem_slug(response.json())


# -- Attempts: one action, with one token, on one transport --------------------------------------


async def http_publish(world: World, token: str | None) -> Outcome:
    async with world.http() as http:
        response = await http.post(
            f"/v1/channels/{world.name}/messages", content=b"x", headers=bearer(token)
        )
    return await _http_outcome(response, 201)


async def http_poll(world: World, token: str | None) -> Outcome:
    message = await world.publish()
    async with world.http() as http:
        response = await http.get(
            f"/v1/channels/{world.name}/messages", params={"after": "0"}, headers=bearer(token)
        )
    if response.status_code == 200:
        assert [m["id"] for m in response.json()["messages"]] == [message]
    return await _http_outcome(response, 200)


async def http_long_poll(world: World, token: str | None) -> Outcome:
    async with world.http() as http:
        waiting = asyncio.ensure_future(
            http.get(
                f"/v1/channels/{world.name}/messages",
                params={"after": "0", "wait": "20"},
                headers=bearer(token),
            )
        )
        await asyncio.sleep(0.05)  # usually parked by now; either way the publish is found
        message = await world.publish()
        response = await waiting
    if response.status_code == 200:
        assert [m["id"] for m in response.json()["messages"]] == [message]
    return await _http_outcome(response, 200)


async def http_info(world: World, token: str | None) -> Outcome:
    async with world.http() as http:
        response = await http.get(f"/v1/channels/{world.name}", headers=bearer(token))
    return await _http_outcome(response, 200)


async def http_retention(world: World, token: str | None) -> Outcome:
    async with world.http() as http:
        response = await http.put(
            f"/v1/channels/{world.name}",
            json={"retention": {"max_count": 10}},
            headers=bearer(token),
        )
    return await _http_outcome(response, 200)


async def _sse(world: World, path: str, headers: dict[str, str], params: dict[str, Any]) -> Outcome:
    """Open the stream; if it opens, publish and expect the message as an event."""
    async with world.http() as http:
        request = http.build_request("GET", path, headers=headers, params=params)
        response = await http.send(request, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                return await _http_outcome(response, 200)
            message = await world.publish("pushed")
            parser = EventParser()
            chunks = response.aiter_raw()
            async with asyncio.timeout(20):
                while True:
                    events = [e for e in parser.events() if e.event == "message"]
                    if events:
                        assert json.loads(events[0].data)["id"] == message
                        return OK
                    parser.receive_data(await anext(chunks))
        finally:
            await response.aclose()


async def sse_header(world: World, token: str | None) -> Outcome:
    return await _sse(world, f"/v1/channels/{world.name}/events", bearer(token), {"after": "0"})


async def sse_query(world: World, token: str | None) -> Outcome:
    params = {"after": "0", **({"token": token} if token else {})}
    return await _sse(world, f"/v1/channels/{world.name}/events", {}, params)


async def sse_multi(world: World, token: str | None) -> Outcome:
    params = {"channel": [world.name, f"{world.name}-b"], **({"token": token} if token else {})}
    return await _sse(world, "/v1/events", {}, params)


async def _ws_open(world: World, path: str, headers: dict[str, str]) -> ClientConnection | Outcome:
    try:
        return await websockets.connect(world.ws_url + path, additional_headers=headers)
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            challenge = exc.response.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="backchannel"')
        return status, problem_slug(json.loads(exc.response.body))


async def _ws_channel(world: World, path: str, headers: dict[str, str]) -> Outcome:
    opened = await _ws_open(world, path, headers)
    if isinstance(opened, tuple):
        return opened
    async with opened as socket_:
        message = await world.publish("pushed")
        try:
            async with asyncio.timeout(20):
                document = json.loads(await socket_.recv())
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None
            slug = exc.rcvd.reason.split(":", 1)[0]
            return {4401: 401, 4403: 403}.get(exc.rcvd.code, exc.rcvd.code), slug
        assert document["id"] == message
        return OK


async def ws_header(world: World, token: str | None) -> Outcome:
    return await _ws_channel(world, f"/v1/channels/{world.name}/ws?after=0", bearer(token))


async def ws_query(world: World, token: str | None) -> Outcome:
    query = f"&token={token}" if token else ""
    return await _ws_channel(world, f"/v1/channels/{world.name}/ws?after=0{query}", {})


async def _mux(world: World, token: str | None, command: dict[str, Any]) -> Outcome:
    """Handshake with the token, send one command; a refused command leaves the connection
    open (a ping still gets its pong)."""
    opened = await _ws_open(world, "/v1/ws", bearer(token))
    if isinstance(opened, tuple):
        return opened
    async with opened as mux:
        async with asyncio.timeout(20):
            await mux.send(json.dumps({"id": 1, **command}))
            answer = json.loads(await mux.recv())
            if answer["op"] == "error":
                await mux.send(json.dumps({"op": "ping", "id": 2}))
                assert json.loads(await mux.recv()) == {"op": "pong", "id": 2}
                return {"forbidden": 403}.get(problem_slug(answer) or "", 400), problem_slug(answer)
            if command["op"] == "subscribe":
                assert answer == {"op": "ok", "id": 1}
                message = await world.publish("pushed")
                pushed = json.loads(await mux.recv())
                assert pushed["op"] == "message" and pushed["message"]["id"] == message
            else:
                assert answer["op"] == "published", answer
        return OK


async def mux_subscribe(world: World, token: str | None) -> Outcome:
    return await _mux(world, token, {"op": "subscribe", "channel": world.name, "after": "0"})


async def mux_publish(world: World, token: str | None) -> Outcome:
    return await _mux(world, token, {"op": "publish", "channel": world.name, "data": {"n": 1}})


class Tcp:
    """A TCP protocol client speaking version 2."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.codec = f.Connection(f.Role.CLIENT)

    @classmethod
    async def open(cls, hub: HubProcess, versions: tuple[int, ...] = f.VERSIONS) -> Tcp:
        tcp = cls(*await asyncio.open_connection("127.0.0.1", hub.tcp_port))
        tcp.send(f.Hello(versions=versions))
        welcome = await tcp.next()
        assert isinstance(welcome, f.Welcome), welcome
        return tcp

    def send(self, frame: f.ClientFrame) -> None:
        self.writer.write(self.codec.send(frame))

    async def next(self) -> f.Event:
        async with asyncio.timeout(20):
            while (event := self.codec.next_event()) is f.NEED_DATA:
                self.codec.receive_data(await self.reader.read(65536))
        return event

    def close(self) -> None:
        self.writer.close()


async def _tcp(world: World, token: str | None, command: f.ClientFrame) -> Outcome:
    tcp = await Tcp.open(world.hub)
    try:
        if token is not None:
            tcp.send(f.Auth(request=1, token=token))
        tcp.send(command)
        event = await tcp.next()
        if token is not None:
            if isinstance(event, f.Error) and event.request == 0:
                # A token that does not verify ends the connection.
                assert await tcp.next() is f.CONNECTION_CLOSED
                return 401, event.type
            assert event == f.Ok(request=1), event
            event = await tcp.next()
        if isinstance(event, f.Error):
            assert event.request == 2
            tcp.send(f.Ping(request=3))  # the connection survives a refused command
            assert await tcp.next() == f.Pong(request=3)
            return {"forbidden": 403}.get(event.type, 401), event.type
        if isinstance(command, f.Subscribe):
            assert event == f.Ok(request=2), event
            message = await world.publish("pushed")
            pushed = await tcp.next()
            assert isinstance(pushed, f.Message) and f"{pushed.seq:016x}" == message
        else:
            assert isinstance(event, f.Published), event
        return OK
    finally:
        tcp.close()


async def tcp_subscribe(world: World, token: str | None) -> Outcome:
    return await _tcp(world, token, f.Subscribe(request=2, channel=world.name, after=0))


async def tcp_publish(world: World, token: str | None) -> Outcome:
    command = f.Publish(request=2, channel=world.name, content_type="text/plain", data=b"x")
    return await _tcp(world, token, command)


async def job_submit(world: World, token: str | None) -> Outcome:
    async with world.http() as http:
        response = await http.post(
            f"/v1/queues/{world.name}/jobs", json={"n": 1}, headers=bearer(token)
        )
    return await _http_outcome(response, 202)


async def job_get(world: World, token: str | None) -> Outcome:
    job_id, _ = await world.job()
    async with world.http() as http:
        response = await http.get(f"/v1/jobs/{job_id}", headers=bearer(token))
    if response.status_code == 200:
        assert response.json()["id"] == job_id
    return await _http_outcome(response, 200)


async def job_long_poll(world: World, token: str | None) -> Outcome:
    job_id, _ = await world.job()
    async with world.http() as http:
        waiting = asyncio.ensure_future(
            http.get(
                f"/v1/jobs/{job_id}", params={"wait": "20", "version": "1"}, headers=bearer(token)
            )
        )
        await asyncio.sleep(0.05)
        cancelled = await http.delete(f"/v1/jobs/{job_id}", headers=bearer(world.admin))
        assert cancelled.status_code == 200
        response = await waiting
    if response.status_code == 200:
        assert response.json()["state"] == "cancelled"
    return await _http_outcome(response, 200)


async def _job_events(world: World, token: str | None, in_query: bool) -> Outcome:
    job_id, _ = await world.job()
    headers = {} if in_query else bearer(token)
    params = {"token": token} if in_query and token else {}
    async with world.http() as http:
        request = http.build_request(
            "GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params
        )
        response = await http.send(request, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                return await _http_outcome(response, 200)
            parser = EventParser()
            async for chunk in response.aiter_raw():
                parser.receive_data(chunk)
                events = parser.events()
                if events:
                    assert json.loads(events[0].data)["id"] == job_id
                    return OK
            raise AssertionError("the stream ended without an event")
        finally:
            await response.aclose()


async def job_events_header(world: World, token: str | None) -> Outcome:
    return await _job_events(world, token, in_query=False)


async def job_events_query(world: World, token: str | None) -> Outcome:
    return await _job_events(world, token, in_query=True)


async def job_cancel(world: World, token: str | None) -> Outcome:
    job_id, _ = await world.job()
    async with world.http() as http:
        response = await http.delete(f"/v1/jobs/{job_id}", headers=bearer(token))
    return await _http_outcome(response, 200)


async def job_claim(world: World, token: str | None) -> Outcome:
    job_id, _ = await world.job()
    async with world.http() as http:
        response = await http.post(
            f"/v1/queues/{world.name}/claim", params={"wait": "1"}, headers=bearer(token)
        )
    if response.status_code == 200:
        assert response.json()["id"] == job_id
    return await _http_outcome(response, 200)


async def job_submit_batch(world: World, token: str | None) -> Outcome:
    async with world.http() as http:
        response = await http.post(
            f"/v1/queues/{world.name}/jobs/batch",
            json={"jobs": [{"payload": {"n": 1}}]},
            headers=bearer(token),
        )
    if response.status_code == 200:
        assert response.json()["jobs"][0]["status"] == 202
    return await _http_outcome(response, 200)


async def job_claim_batch(world: World, token: str | None) -> Outcome:
    job_id, _ = await world.job()
    async with world.http() as http:
        response = await http.post(
            f"/v1/queues/{world.name}/claim",
            params={"wait": "1", "max": "5"},
            headers=bearer(token),
        )
    if response.status_code == 200:
        assert [job["id"] for job in response.json()["jobs"]] == [job_id]
    return await _http_outcome(response, 200)


async def job_results_batch(world: World, token: str | None) -> Outcome:
    job_id, lease = await world.job(claimed=True)
    async with world.http() as http:
        response = await http.post(
            f"/v1/queues/{world.name}/results",
            json={"results": [{"id": job_id, "lease": lease, "result": 1}]},
            headers=bearer(token),
        )
    if response.status_code == 200:
        assert response.json()["results"][0]["state"] == "succeeded"
    return await _http_outcome(response, 200)


async def jobs_events(world: World, token: str | None) -> Outcome:
    job_id, lease = await world.job(claimed=True)
    async with world.http() as http:
        done = await http.post(
            f"/v1/jobs/{job_id}/complete",
            json={"lease": lease, "result": 1},
            headers=bearer(world.admin),
        )
        assert done.status_code == 200
        params = {"id": job_id, **({"token": token} if token else {})}
        response = await http.get("/v1/jobs/events", params=params)
    if response.status_code == 200:
        events = EventParser()
        events.receive_data(response.content)
        assert [json.loads(e.data)["state"] for e in events.events()] == ["succeeded"]
    return await _http_outcome(response, 200)


def _worker_command(action: str, body: dict[str, Any]) -> Callable[..., Awaitable[Outcome]]:
    async def attempt(world: World, token: str | None) -> Outcome:
        job_id, lease = await world.job(claimed=True)
        async with world.http() as http:
            response = await http.post(
                f"/v1/jobs/{job_id}/{action}", json={"lease": lease, **body}, headers=bearer(token)
            )
        return await _http_outcome(response, 200)

    attempt.__name__ = f"job_{action}"
    return attempt


ATTEMPTS: dict[str, Callable[[World, str | None], Awaitable[Outcome]]] = {
    f.__name__: f
    for f in (
        http_publish,
        http_poll,
        http_long_poll,
        http_info,
        http_retention,
        sse_header,
        sse_query,
        sse_multi,
        ws_header,
        ws_query,
        mux_subscribe,
        mux_publish,
        tcp_subscribe,
        tcp_publish,
        job_submit,
        job_get,
        job_long_poll,
        job_events_header,
        job_events_query,
        job_cancel,
        job_claim,
        job_submit_batch,
        job_claim_batch,
        job_results_batch,
        jobs_events,
        _worker_command("heartbeat", {}),
        _worker_command("progress", {"progress": 0.5}),
        _worker_command("complete", {"result": {"ok": True}}),
        _worker_command("fail", {"error": "no", "retry": False}),
    )
}
#: Attempts whose valid token must also grant admin (and which a plain token is forbidden).
NEEDS_ADMIN = {"http_retention"}


def world_for(hub: HubProcess, keys: Keys) -> World:
    return World(hub, keys.token(bc=EVERYTHING), f"ok.{uuid.uuid4().hex[:12]}")


def valid_claims(attempt: str) -> dict[str, Any]:
    grants = {"publish": ["ok.*"], "subscribe": ["ok.*"], "submit": ["ok.*"], "claim": ["ok.*"]}
    return {**grants, "admin": True} if attempt in NEEDS_ADMIN else grants


# -- The matrix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
async def test_refused_token(hub: HubProcess, keys: Keys, attempt: str, case: str) -> None:
    world = world_for(hub, keys)
    assert await ATTEMPTS[attempt](world, keys.bad(case)) == (401, REFUSED[case])


@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
async def test_valid_token_for_another_name_is_forbidden(
    hub: HubProcess, keys: Keys, attempt: str
) -> None:
    world = world_for(hub, keys)
    # For admin routes, "another name" is a token that is not admin.
    grants = valid_claims("") if attempt in NEEDS_ADMIN else ELSEWHERE
    assert await ATTEMPTS[attempt](world, keys.token(bc=grants)) == FORBIDDEN


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
async def test_valid_token_works(hub: HubProcess, keys: Keys, attempt: str, alg: str) -> None:
    world = world_for(hub, keys)
    assert await ATTEMPTS[attempt](world, keys.token(alg, bc=valid_claims(attempt))) == OK


JWKS_ATTEMPTS = ["http_publish", "sse_query", "mux_subscribe", "tcp_subscribe", "job_claim"]


@pytest.mark.parametrize("attempt", JWKS_ATTEMPTS)
async def test_jwks_hub(jwks_hub: HubProcess, keys: Keys, attempt: str) -> None:
    admin = keys.token("RS256", kid="rsa-1", bc=EVERYTHING)

    async def run(token: str) -> Outcome:
        world = World(jwks_hub, admin, f"ok.{uuid.uuid4().hex[:12]}")
        return await ATTEMPTS[attempt](world, token)

    assert await run(keys.token("RS256", kid="rsa-1")) == OK
    assert await run(keys.token("ES256", kid="ec-1")) == OK
    assert await run(keys.token("ES256", kid="ec-1", bc=ELSEWHERE)) == FORBIDDEN
    # The hub has no secret: HS256 is not on its list, whatever key signed it.
    for token in (
        keys.token("HS256"),
        keys.hmac_with_public_key(),
        keys.alg_none(),
        keys.wrong_signature("RS256"),
        keys.token("RS256", kid="unknown"),
    ):
        assert await run(token) == (401, "invalid-token")


async def test_a_version_1_tcp_client_cannot_authenticate(hub: HubProcess, keys: Keys) -> None:
    tcp = await Tcp.open(hub, versions=(1,))
    try:
        assert tcp.codec.version == 1
        with pytest.raises(f.LocalProtocolError):
            tcp.send(f.Auth(request=1, token=keys.token()))
        tcp.send(f.Subscribe(request=1, channel="ok.x"))
        event = await tcp.next()
        assert isinstance(event, f.Error) and (event.request, event.type) == (1, "token-required")
    finally:
        tcp.close()


async def test_a_second_auth_is_refused(hub: HubProcess, keys: Keys) -> None:
    tcp = await Tcp.open(hub)
    try:
        tcp.send(f.Auth(request=1, token=keys.token()))
        assert await tcp.next() == f.Ok(request=1)
        tcp.send(f.Auth(request=2, token=keys.token(bc=EVERYTHING)))
        event = await tcp.next()
        assert isinstance(event, f.Error) and (event.request, event.type) == (2, "invalid-command")
    finally:
        tcp.close()


def test_tokens_in_urls_stay_out_of_the_access_log(
    hub_factory: type[HubProcess], keys: Keys
) -> None:
    logged = hub_factory(
        "--auth-secret-file",
        str(keys.secret_file),
        "--auth-audience",
        AUDIENCE,
        "--access-log",
        "--log-level",
        "info",
    ).start()
    token = keys.token()
    with logged.client() as http:
        params = {"channel": "ok.a", "token": token}
        with http.stream("GET", "/v1/events", params=params) as stream:
            assert stream.status_code == 200
        response = http.get("/v1/channels/ok.a/messages", headers=bearer(token))
        assert response.status_code == 200
    logged.terminate()
    log = logged.err_path.read_text() + logged.out_path.read_text()
    assert "/v1/events?channel=ok.a&token=REDACTED" in log
    assert token not in log
    assert token.split(".")[2] not in log  # not even the signature


# -- Expiry --------------------------------------------------------------------------------------


async def _sse_end(world: World, path: str, params: dict[str, str], headers: dict[str, str]) -> str:
    async with world.http() as http:
        request = http.build_request("GET", path, params=params, headers=headers)
        response = await http.send(request, stream=True)
        assert response.status_code == 200
        parser = EventParser()
        last = None
        async for chunk in response.aiter_raw():
            parser.receive_data(chunk)
            for event in parser.events():
                last = event
        await response.aclose()
    assert last is not None and last.event == "token-expired", last
    assert problem_slug(json.loads(last.data)) == "token-expired"
    return "token-expired event, then the end"


async def _ws_end(world: World, path: str, token: str) -> str:
    async with websockets.connect(world.ws_url + path, additional_headers=bearer(token)) as ws:
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None
            return f"close {exc.rcvd.code} {exc.rcvd.reason.split(':')[0]}"


async def _tcp_end(world: World, token: str) -> str:
    tcp = await Tcp.open(world.hub)
    tcp.send(f.Auth(request=1, token=token))
    tcp.send(f.Subscribe(request=2, channel=world.name))
    assert await tcp.next() == f.Ok(request=1)
    assert await tcp.next() == f.Ok(request=2)
    event = await tcp.next()
    assert await tcp.next() is f.CONNECTION_CLOSED
    tcp.close()
    assert isinstance(event, f.Error)
    return f"error {event.request} {event.type}"


async def _answered(
    world: World,
    method: str,
    path: str,
    token: str,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> str:
    async with world.http() as http:
        response = await http.request(
            method, path, headers={**bearer(token), **(headers or {})}, **kw
        )
    body = response.json() if response.content else None
    if isinstance(body, dict) and "messages" in body:
        return f"{response.status_code} {len(body['messages'])} messages"
    if isinstance(body, dict) and "state" in body:
        return f"{response.status_code} {body['state']}"
    return str(response.status_code)


async def test_long_lived_requests_end_when_the_token_expires(hub: HubProcess, keys: Keys) -> None:
    world = world_for(hub, keys)
    job_id, _ = await world.job()
    # Long enough to open everything on a busy machine, short enough to wait for.
    exp = int(time.time()) + 4
    token = keys.token(exp=exp, bc=valid_claims(""))
    name = world.name
    ends = {
        "sse": _sse_end(world, f"/v1/channels/{name}/events", {}, bearer(token)),
        "sse ?token=": _sse_end(world, f"/v1/channels/{name}/events", {"token": token}, {}),
        "sse, several channels": _sse_end(
            world, "/v1/events", {"channel": name, "token": token}, {}
        ),
        "job events": _sse_end(world, f"/v1/jobs/{job_id}/events", {}, bearer(token)),
        "ws": _ws_end(world, f"/v1/channels/{name}/ws", token),
        "/v1/ws": _ws_end(world, "/v1/ws", token),
        "tcp": _tcp_end(world, token),
        "long poll": _answered(
            world, "GET", f"/v1/channels/{name}/messages", token, params={"wait": "50"}
        ),
        "job long poll": _answered(
            world, "GET", f"/v1/jobs/{job_id}", token, params={"wait": "50", "version": "1"}
        ),
        "claim": _answered(
            world, "POST", f"/v1/queues/{name}-empty/claim", token, params={"wait": "50"}
        ),
        "Prefer: wait": _answered(
            world,
            "POST",
            f"/v1/queues/{name}-idle/jobs",
            token,
            headers={"prefer": "wait=50"},
            json={"n": 1},
        ),
    }

    async def timed(end: Awaitable[str]) -> tuple[str, bool]:
        how = await end
        # The hub ends each at exp (its timers may fire a moment before the wall clock says
        # so): never well before.
        return how, time.time() >= exp - 0.05

    async with asyncio.timeout(40):  # a stuck one fails here instead of hanging the suite
        results = dict(zip(ends, await asyncio.gather(*map(timed, ends.values())), strict=True))
    assert results == {
        "sse": ("token-expired event, then the end", True),
        "sse ?token=": ("token-expired event, then the end", True),
        "sse, several channels": ("token-expired event, then the end", True),
        "job events": ("token-expired event, then the end", True),
        "ws": ("close 4401 token-expired", True),
        "/v1/ws": ("close 4401 token-expired", True),
        "tcp": ("error 0 token-expired", True),
        "long poll": ("200 0 messages", True),
        "job long poll": ("200 queued", True),
        "claim": ("204", True),
        "Prefer: wait": ("202 queued", True),
    }


# -- Start-up ------------------------------------------------------------------------------------


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("BACKCHANNEL_")}
    return subprocess.run(
        [sys.executable, "-m", "backchannel", "serve", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port bound on 0.0.0.0 but never listening, so nobody can connect to it: a hub that
    gets as far as binding it fails with "cannot listen" (this socket does not share with
    SO_REUSEADDR), so a refusal that names auth instead proves the hub refused before it bound
    anything, and a hub that passes the check still never listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    yield sock.getsockname()[1]
    sock.close()


def test_no_auth_on_a_public_address_refuses_before_listening(
    tmp_path: Path, held_port: int
) -> None:
    done = _serve(tmp_path, "--host", "0.0.0.0", "--port", str(held_port), "--tcp-port", "0")
    assert done.returncode != 0
    assert "refusing to serve on 0.0.0.0 without authentication" in done.stderr
    assert "--insecure" in done.stderr
    assert "listening" not in done.stdout
    assert "cannot listen" not in done.stderr


def test_insecure_or_a_key_gets_past_the_check(tmp_path: Path, held_port: int, keys: Keys) -> None:
    # Both reach the bind, which fails on the held port: nothing ever listened.
    port = ["--port", str(held_port), "--tcp-port", "0", "--host", "0.0.0.0"]
    for extra in (["--insecure"], ["--auth-secret-file", str(keys.secret_file)]):
        done = _serve(tmp_path, *port, *extra)
        assert done.returncode != 0
        assert "refusing" not in done.stderr
        assert f"cannot listen on 0.0.0.0:{held_port}" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auth-secret", "too-short"], "at least 32"),
        (["--auth-secret-file", "/nonexistent/secret"], "cannot read the secret file"),
        (["--auth-public-keys", "/nonexistent/key.pem"], "cannot read the public key file"),
        (["--auth-leeway", "-5"], "auth_leeway"),
    ],
)
def test_bad_auth_settings_stop_serve(tmp_path: Path, args: list[str], message: str) -> None:
    done = _serve(tmp_path, "--port", "0", "--tcp-port", "0", *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert "listening" not in done.stdout
