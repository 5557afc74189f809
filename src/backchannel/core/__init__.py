"""The domain: channels, messages, cursors, retention and the hub that ties them to a store."""

from .channels import Retention, validate_channel
from .errors import BackchannelError, IdempotencyKeyReused, InvalidRequest, TooBusy, Unavailable
from .hub import ChannelInfo, Hub, Limits, Page
from .messages import Appended, ChannelStats, Draft, Message
from .store import Listener, Store

__all__ = [
    "Appended",
    "BackchannelError",
    "ChannelInfo",
    "ChannelStats",
    "Draft",
    "Hub",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "Limits",
    "Listener",
    "Message",
    "Page",
    "Retention",
    "Store",
    "TooBusy",
    "Unavailable",
    "validate_channel",
]
