"""The reliability suite runs real hub processes, as the end-to-end tests do."""

from __future__ import annotations

from ..e2e.conftest import HubProcess, hub_factory

__all__ = ["HubProcess", "hub_factory"]
