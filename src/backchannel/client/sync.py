"""A blocking client for the hub's HTTP API."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import orjson

from .errors import HubError, HubUnreachable

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """``Client(url)`` talks to one hub over pooled HTTP connections. Use it as a context
    manager, or call :meth:`close`."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def publish(
        self,
        channel: str,
        data: Any = None,
        *,
        content: bytes | str | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Publish ``data`` as JSON, or raw ``content`` with ``content_type``."""
        headers: dict[str, str] = {}
        if content is None:
            body = orjson.dumps(data)
            headers["content-type"] = "application/json"
        else:
            body = content.encode() if isinstance(content, str) else content
            headers["content-type"] = content_type or (
                "text/plain; charset=utf-8"
                if isinstance(content, str)
                else "application/octet-stream"
            )
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        return self._request(
            "POST", f"/v1/channels/{_segment(channel)}/messages", content=body, headers=headers
        )

    def poll(
        self,
        channel: str,
        *,
        after: str | None = None,
        limit: int | None = None,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """Messages after ``after``; with ``wait``, a long poll of up to that many seconds."""
        page: dict[str, Any] = orjson.loads(
            self.poll_raw(channel, after=after, limit=limit, wait=wait)
        )
        return page

    def poll_raw(
        self,
        channel: str,
        *,
        after: str | None = None,
        limit: int | None = None,
        wait: float | None = None,
    ) -> bytes:
        """:meth:`poll`'s answer as the hub sent it: JSON bytes."""
        params: dict[str, str] = {}
        if after is not None:
            params["after"] = after
        if limit is not None:
            params["limit"] = str(limit)
        timeout = self._http.timeout
        if wait:
            params["wait"] = f"{wait:g}"
            read = (timeout.read or 0) + wait
            timeout = httpx.Timeout(
                timeout.connect, read=read, write=timeout.write, pool=timeout.pool
            )
        response = self._send(
            "GET", f"/v1/channels/{_segment(channel)}/messages", params=params, timeout=timeout
        )
        return response.content

    def info(self, channel: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/channels/{_segment(channel)}")

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._send(method, path, **kwargs).json()
        return result

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise HubUnreachable(f"cannot reach the hub at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:200]}
            raise HubError(
                response.status_code,
                problem if isinstance(problem, dict) else {},
                response.headers,
            )
        return response


def _segment(channel: str) -> str:
    return quote(channel, safe="")
