"""The ASGI application, the HTTP endpoints, configuration and process start-up."""

from .app import BackchannelApp, create_app
from .config import Settings

__all__ = ["BackchannelApp", "Settings", "create_app"]
