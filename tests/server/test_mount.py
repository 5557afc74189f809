"""The hub mounted inside a Starlette app, as users of FastAPI or Starlette would."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from backchannel import Settings, create_app
from backchannel.store import MemoryStore


async def test_mounted_under_a_prefix() -> None:
    hub = create_app(Settings(), store=MemoryStore())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.startup()
        yield
        await hub.shutdown()

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("host app")

    host = Starlette(routes=[Route("/", home), Mount("/hub", app=hub)], lifespan=lifespan)
    transport = httpx.ASGITransport(app=host)
    async with lifespan(host), httpx.AsyncClient(transport=transport, base_url="http://x") as c:
        assert (await c.get("/")).text == "host app"
        published = await c.post("/hub/v1/channels/a%3Ab/messages", json={"ok": True})
        assert published.status_code == 201
        page = (await c.get("/hub/v1/channels/a:b/messages")).json()
        assert page["messages"][0]["data"] == {"ok": True}
        missing = await c.get("/hub/nowhere")
        assert missing.status_code == 404
        # Type and instance resolve against the host, so they carry the mount prefix.
        assert missing.json()["instance"] == "/hub/nowhere"
        assert missing.json()["type"] == "/hub/problems/not-found"
        described = (await c.get(missing.json()["type"])).json()
        assert (described["status"], described["type"]) == (404, "/hub/problems/not-found")


async def test_starts_lazily_without_lifespan() -> None:
    hub = create_app(Settings(), store=MemoryStore())
    host = Starlette(routes=[Mount("/hub", app=hub)])  # no lifespan forwarding at all
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
        assert (await c.post("/hub/v1/channels/c/messages", content=b"x")).status_code == 201
    assert hub.hub.started
    await hub.shutdown()
