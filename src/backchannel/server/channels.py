"""HTTP endpoints of channels: publish, poll (short and long), info, retention."""

from __future__ import annotations

import math
from typing import Any

import orjson

from ..core.channels import validate_channel
from ..core.grants import Action
from ..core.hub import ChannelInfo
from ..wire import InvalidCursor, parse_id
from ..wire.jsonfmt import encode_page, format_time
from .auth import require, require_admin
from .http import JSON, ClientDisconnected, Request, Response, json_response
from .problems import HTTPProblem

NO_STORE = (b"cache-control", b"no-store")
MAX_SETTINGS_BYTES = 16 * 1024


async def publish(request: Request) -> Response:
    hub = request.app.hub
    channel = validate_channel(request.params["channel"])
    require(request.identity, Action.PUBLISH, channel)
    key = request.header(b"idempotency-key")
    data = await request.body(hub.limits.max_message_bytes)
    appended = await hub.publish(
        channel, data, content_type=request.header(b"content-type"), idempotency_key=key
    )
    message = appended.message
    headers = [NO_STORE]
    if appended.replayed:
        headers.append((b"idempotent-replayed", b"true"))
    return json_response(
        201,
        {"id": message.id, "channel": channel, "time": format_time(message.time_ms)},
        headers,
    )


async def poll(request: Request) -> Response:
    hub = request.app.hub
    channel = validate_channel(request.params["channel"])
    require(request.identity, Action.SUBSCRIBE, channel)
    query = request.query()
    after = _cursor(query.get("after"))
    limit = request.query_whole("limit")
    # A long poll answers when the caller's token expires, at the latest.
    wait = request.cap_wait(hub.check_wait(request.query_seconds("wait") or 0.0))
    if wait:
        page = await request.until_disconnected(
            hub.poll(channel, after=after, limit=limit, wait=wait)
        )
    else:
        page = await hub.poll(channel, after=after, limit=limit)
    body = encode_page([m.json for m in page.messages], page.next_after)
    return Response(200, body, JSON, [NO_STORE])


async def channel_info(request: Request) -> Response:
    channel = validate_channel(request.params["channel"])
    require(request.identity, Action.SUBSCRIBE, channel)
    info = await request.app.hub.info(channel)
    return json_response(200, _info_document(info), [NO_STORE])


async def configure_channel(request: Request) -> Response:
    channel = validate_channel(request.params["channel"])
    require_admin(request.identity)
    body = await request.body(MAX_SETTINGS_BYTES, "16 KiB for channel settings")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPProblem("malformed-json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or set(document) != {"retention"}:
        raise HTTPProblem(
            "invalid-retention",
            'the body is {"retention": {"max_count": N, "max_age": SECONDS}}, either limit '
            'optional, or {"retention": null} to follow the server defaults',
        )
    max_count, max_age_ms = _retention(document["retention"])
    info = await request.app.hub.configure(channel, max_count=max_count, max_age_ms=max_age_ms)
    return json_response(200, _info_document(info), [NO_STORE])


def _retention(value: Any) -> tuple[int | None, int | None]:
    """The channel's own limits from a PUT body; a limit left out follows the default."""
    if value is None:
        return None, None
    if not isinstance(value, dict) or set(value) - {"max_count", "max_age"}:
        raise HTTPProblem("invalid-retention", "retention takes max_count and max_age")
    max_count = value.get("max_count")
    max_age = value.get("max_age")
    # JSON has one number type: 1000.0 is the whole number 1000, as JSON Schema's "integer" says.
    if isinstance(max_count, float) and max_count.is_integer() and abs(max_count) < 2**53:
        max_count = int(max_count)
    if max_count is not None and (not isinstance(max_count, int) or isinstance(max_count, bool)):
        raise HTTPProblem("invalid-retention", "max_count must be a whole number")
    if max_age is not None and (
        not isinstance(max_age, int | float)
        or isinstance(max_age, bool)
        or not math.isfinite(max_age)
        or abs(max_age) > 1e12
    ):
        raise HTTPProblem("invalid-retention", "max_age must be a number of seconds")
    return max_count, None if max_age is None else int(max_age * 1000)


def _info_document(info: ChannelInfo) -> dict[str, object]:
    return {
        "channel": info.channel,
        "last_id": info.last_id,
        "first_id": info.first_id,
        "retained": info.retained,
        "retention": {
            "max_count": info.retention.max_count,
            "max_age": info.retention.max_age_ms / 1000,
        },
        "subscribers": info.subscribers,
    }


def _cursor(value: str | None) -> int:
    if value is None:
        return 0
    try:
        return parse_id(value)
    except InvalidCursor as exc:
        raise HTTPProblem("invalid-cursor", str(exc)) from None


__all__ = ["ClientDisconnected", "channel_info", "configure_channel", "poll", "publish"]
