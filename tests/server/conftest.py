from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from backchannel import Settings, create_app
from backchannel.server import BackchannelApp
from backchannel.store import MemoryStore


@pytest.fixture
async def app() -> AsyncIterator[BackchannelApp]:
    settings = Settings(
        max_message_bytes=1000, max_limit=50, default_limit=20, max_wait=5, max_long_polls=20
    )
    application = create_app(settings, store=MemoryStore(retention=settings.retention))
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def client(app: BackchannelApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as c:
        yield c
