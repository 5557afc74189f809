"""backchannel: a communication hub for Python backends.

Channels on a durable log, reached by publishing, polling, long polling and push (SSE,
WebSocket, TCP); jobs with workers and leases. Import the server (``create_app``), the client
twins (``Client``, ``AsyncClient``) and ``Worker`` from here.
"""

__version__ = "0.1.0"

from .client import AsyncClient, Client, ClientError, HubError, HubUnreachable, Worker
from .core import Retention
from .server import BackchannelApp, Settings, create_app

__all__ = [
    "AsyncClient",
    "BackchannelApp",
    "Client",
    "ClientError",
    "HubError",
    "HubUnreachable",
    "Retention",
    "Settings",
    "Worker",
    "__version__",
    "create_app",
]
