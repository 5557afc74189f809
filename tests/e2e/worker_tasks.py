"""Task functions that ``backchannel worker`` loads in the end-to-end tests."""

from __future__ import annotations

from typing import Any


def double(payload: dict[str, Any]) -> dict[str, Any]:
    return {"doubled": payload["n"] * 2}
