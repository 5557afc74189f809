"""Exceptions raised by the client.

::

    ClientError
    ├── HubUnreachable     no connection could be made, or it broke before an answer
    └── HubError           the hub answered with an error; ``.problem`` has its document
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ClientError(Exception):
    pass


class HubUnreachable(ClientError):
    pass


class HubError(ClientError):
    def __init__(
        self, status: int, problem: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        self.status = status
        self.problem = problem
        self.headers: Mapping[str, str] = headers or {}  # case-insensitive, e.g. Retry-After
        title = problem.get("title") or f"HTTP {status}"
        detail = problem.get("detail")
        super().__init__(f"{title}: {detail}" if detail else title)

    @property
    def type(self) -> str:
        return str(self.problem.get("type", "about:blank"))
