"""The client SDK: talk to a hub from Python."""

from .errors import ClientError, HubError, HubUnreachable
from .sync import DEFAULT_URL, Client

__all__ = ["DEFAULT_URL", "Client", "ClientError", "HubError", "HubUnreachable"]
