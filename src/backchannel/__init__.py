"""backchannel: a communication hub for Python backends.

Channels on a durable log, reached by publishing, short polling and long polling over HTTP.
"""

__version__ = "0.1.0"

from .client import Client, ClientError, HubError, HubUnreachable
from .core import Retention
from .server import BackchannelApp, Settings, create_app

__all__ = [
    "BackchannelApp",
    "Client",
    "ClientError",
    "HubError",
    "HubUnreachable",
    "Retention",
    "Settings",
    "__version__",
    "create_app",
]
