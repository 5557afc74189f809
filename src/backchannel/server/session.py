"""What the multiplexed transports share: one connection's subscriptions and its commands.

``/v1/ws`` (JSON) and the TCP protocol (binary) carry the same commands; they differ only in
how commands and answers are written. A :class:`Session` applies the commands to the hub and
raises the problem a refused command is answered with.
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.channels import validate_channel
from ..core.fanout import Sink, Subscription
from ..core.grants import Action
from ..core.hub import Hub
from ..core.messages import Appended, Message
from .auth import Identity, require, unauthorized
from .problems import HTTPProblem


class Session:
    def __init__(
        self,
        hub: Hub,
        sink: Sink,
        encode: Callable[[Message], bytes],
        *,
        transport: str,
        max_subscriptions: int,
        identity: Identity | None,
    ) -> None:
        #: Who the connection acts for; None until a TCP connection has sent AUTH to a hub
        #: with auth on.
        self.identity = identity
        self.hub = hub
        self.sink = sink
        self.encode = encode
        self.transport = transport
        self.max_subscriptions = max_subscriptions
        self.subscriptions: dict[str, Subscription] = {}

    def authorize(self, action: Action, channel: str) -> None:
        """Raise the problem a command gets when the connection's token does not allow it."""
        identity = self.identity
        if identity is None:
            raise unauthorized("token-required", "the hub requires a token: send AUTH first")
        # The connection is closed when its token expires; this covers the moment before.
        if identity.expires is not None and self.hub.now_ms() >= identity.expires * 1000:
            raise unauthorized("token-expired", "the connection's token has expired")
        require(identity, action, channel)

    def subscribe(self, channel: str, after: int | None, acknowledge: Callable[[], None]) -> None:
        """Subscribe to ``channel``; ``acknowledge`` queues the answer, before the subscription
        can queue any message."""
        validate_channel(channel)
        self.authorize(Action.SUBSCRIBE, channel)
        if channel in self.subscriptions:
            raise HTTPProblem("already-subscribed", f"already subscribed to {channel}")
        if len(self.subscriptions) >= self.max_subscriptions:
            raise HTTPProblem(
                "too-many-subscriptions",
                f"a connection may subscribe to at most {self.max_subscriptions} channels",
            )
        acknowledge()
        self.subscriptions[channel] = self.hub.subscribe(
            channel, self.sink, self.encode, transport=self.transport, after=after
        )

    def unsubscribe(self, channel: str) -> None:
        validate_channel(channel)
        subscription = self.subscriptions.pop(channel, None)
        if subscription is None:
            raise HTTPProblem("not-subscribed", f"not subscribed to {channel}")
        self.hub.unsubscribe(subscription)

    async def publish(
        self, channel: str, data: bytes, content_type: str | None, idempotency_key: str | None
    ) -> Appended:
        validate_channel(channel)
        self.authorize(Action.PUBLISH, channel)
        if len(data) > self.hub.limits.max_message_bytes:
            raise HTTPProblem(
                "message-too-large",
                f"the message is larger than {self.hub.limits.max_message_bytes} bytes",
            )
        return await self.hub.publish(
            channel, data, content_type=content_type, idempotency_key=idempotency_key
        )

    def close(self) -> None:
        for subscription in self.subscriptions.values():
            self.hub.unsubscribe(subscription)
        self.subscriptions.clear()
