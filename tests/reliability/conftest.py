"""The reliability suite runs real hub processes, like the end-to-end tests."""

from tests.e2e.conftest import HubProcess, hub_factory  # noqa: F401 - shared fixtures

__all__ = ["HubProcess"]
