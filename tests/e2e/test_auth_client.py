"""Tokens from the SDK and the CLI, against a real hub with auth: sent on every call and every
subscription, 401/403 raised as Unauthorized/Forbidden, expired subscriptions refreshed by a
token function (or raised for a fixed token), the worker and the ``backchannel token``
command."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from backchannel.client import (
    VIAS,
    AsyncClient,
    Client,
    Forbidden,
    HubError,
    Unauthorized,
    Worker,
)

from ..jwt_keys import AUDIENCE, EVERYTHING, SECRET, Keys
from .conftest import HubProcess

pytestmark = pytest.mark.e2e
PUSH = ("sse", "ws", "tcp")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def hub(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    folder = tmp_path_factory.mktemp("hub")
    process = HubProcess(
        folder / "data",
        folder,
        "--auth-secret-file",
        str(keys.secret_file),
        "--auth-audience",
        AUDIENCE,
    )
    try:
        yield process.start()
    finally:
        process.stop()


def token(keys: Keys, seconds: float = 300, **grants: Any) -> str:
    now = time.time()
    claims = {"aud": AUDIENCE, "exp": int(now + seconds), "bc": grants or EVERYTHING}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def fresh() -> str:
    return f"ok.{uuid.uuid4().hex[:12]}"


def test_every_call_and_subscription_carries_the_token(hub: HubProcess, keys: Keys) -> None:
    channel = fresh()
    with Client(hub.url, tcp_port=hub.tcp_port, token=token(keys)) as client:
        published = client.publish(channel, {"n": 1})
        assert client.poll(channel).messages[0].id == published.id
        assert client.info(channel)["last_id"] == published.id
        for via in VIAS:
            with client.subscribe(channel, via=via, after="0") as subscription:
                assert next(subscription).id == published.id, via


@pytest.mark.parametrize("via", VIAS)
def test_refusals_are_typed_and_not_retried(hub: HubProcess, keys: Keys, via: str) -> None:
    channel = fresh()
    elsewhere = token(keys, subscribe=["elsewhere"], publish=["elsewhere"])
    cases: list[tuple[str | None, type[HubError], str]] = [
        (None, Unauthorized, "token-required"),
        ("not-a-jwt", Unauthorized, "invalid-token"),
        (token(keys, seconds=-60), Unauthorized, "token-expired"),
        (elsewhere, Forbidden, "forbidden"),
    ]
    for given, kind, slug in cases:
        with Client(hub.url, tcp_port=hub.tcp_port, token=given, reconnect_limit=3) as client:
            with pytest.raises(kind) as caught:
                client.publish(channel, 1)
            assert caught.value.slug == slug
            subscription = client.subscribe(channel, via=via, after="0")
            with pytest.raises(kind) as caught:
                next(subscription)
            assert caught.value.slug == slug, via
            assert subscription.resume.reconnects == 0  # refused, not retried
            subscription.close()


def test_the_token_comes_from_the_environment(
    hub: HubProcess, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKCHANNEL_TOKEN", token(keys))
    with Client(hub.url) as client:
        assert client.publish(fresh(), 1).id
        assert "eyJ" not in repr(client)


class Provider:
    """A token function that counts its calls and hands out short-lived tokens."""

    def __init__(self, keys: Keys, seconds: float) -> None:
        self.keys, self.seconds, self.calls = keys, seconds, 0

    def __call__(self) -> str:
        self.calls += 1
        return token(self.keys, seconds=self.seconds)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.05)


async def test_a_token_function_carries_subscriptions_across_expiry(
    hub: HubProcess, keys: Keys
) -> None:
    admin = AsyncClient(hub.url, token=token(keys))

    async def follow(via: str) -> tuple[list[str], list[str], int]:
        channel = fresh()
        provider = Provider(keys, seconds=3)
        first = await admin.publish(channel, "before")
        async with (
            AsyncClient(hub.url, tcp_port=hub.tcp_port, token=provider) as client,
            client.subscribe(channel, via=via, after="0") as subscription,
        ):
            got = [(await anext(subscription)).id]
            waiting = asyncio.ensure_future(anext(subscription))
            # The token expires; the stream ends; the subscription asks for a new token.
            await _until(lambda: provider.calls >= 2)
            second = await admin.publish(channel, "after")
            got.append((await waiting).id)
        return got, [first.id, second.id], provider.calls

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(follow(via) for via in PUSH))
    await admin.aclose()
    for via, (got, published, calls) in zip(PUSH, results, strict=True):
        assert got == published, via  # nothing lost, nothing repeated
        assert calls >= 2, via


async def test_a_fixed_token_ends_subscriptions_with_unauthorized(
    hub: HubProcess, keys: Keys
) -> None:
    async def follow(via: str) -> str:
        async with AsyncClient(
            hub.url, tcp_port=hub.tcp_port, token=token(keys, seconds=3)
        ) as client:
            subscription = client.subscribe(fresh(), via=via, after="0")
            try:
                await anext(subscription)
            except Unauthorized as exc:
                return exc.slug
            finally:
                await subscription.aclose()
        return "no error"

    async with asyncio.timeout(60):
        slugs = await asyncio.gather(*(follow(via) for via in PUSH))
    assert slugs == ["token-expired"] * len(PUSH)


def test_a_worker_with_a_token(hub: HubProcess, keys: Keys) -> None:
    queue = fresh()
    worker = Worker(hub.url, token=token(keys, claim=[queue]), lease=5)
    worker.task(queue)(lambda payload: {"doubled": payload["n"] * 2})
    threading.Thread(target=worker.run, daemon=True).start()
    try:
        with Client(hub.url, token=token(keys, submit=[queue])) as client:
            assert client.submit(queue, {"n": 21}).result(timeout=30) == {"doubled": 42}
    finally:
        worker.stop()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    return subprocess.run(
        [sys.executable, "-m", "backchannel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def test_cli_mints_and_sends_tokens(hub: HubProcess, keys: Keys) -> None:
    channel = fresh()
    minted = _cli(
        "token",
        "--secret-file",
        str(keys.secret_file),
        "--publish",
        channel,
        "--subscribe",
        "ok.*",
        "--audience",
        AUDIENCE,
        "--ttl",
        "60",
    )
    assert minted.returncode == 0, minted.stderr
    cli_token = minted.stdout.strip()
    claims = jwt.decode(cli_token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["bc"] == {"publish": [channel], "subscribe": ["ok.*"]}
    assert claims["exp"] - claims["iat"] == 60

    published = _cli("publish", channel, "hi", "--url", hub.url, "--token", cli_token)
    assert published.returncode == 0, published.stderr
    polled = _cli("poll", channel, "--url", hub.url, env={"BACKCHANNEL_TOKEN": cli_token})
    assert polled.returncode == 0 and '"data":"hi"' in polled.stdout
    refused = _cli("publish", "ok.other", "hi", "--url", hub.url, "--token", cli_token)
    assert refused.returncode == 1
    assert "Forbidden" in refused.stderr and cli_token not in refused.stderr
    missing = _cli("poll", channel, "--url", hub.url)
    assert missing.returncode == 1 and "Token required" in missing.stderr


def test_cli_token_needs_a_good_secret(tmp_path: Any) -> None:
    assert "no secret" in _cli("token").stderr
    short = _cli("token", env={"BACKCHANNEL_AUTH_SECRET": "short"})
    assert short.returncode != 0 and "at least 32" in short.stderr
    bad = _cli("token", "--subscribe", "no spaces", env={"BACKCHANNEL_AUTH_SECRET": "x" * 32})
    assert bad.returncode != 0 and "not a pattern" in bad.stderr
