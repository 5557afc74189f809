"""Errors of the domain. Each names a stable ``kind`` that the server turns into a problem type.

::

    BackchannelError
    ├── InvalidRequest            the caller sent something the hub cannot accept
    │   kinds: invalid-channel, invalid-cursor, malformed-json, invalid-text,
    │          unsupported-media-type, message-too-large, invalid-idempotency-key,
    │          invalid-retention, limit-out-of-range, wait-out-of-range
    ├── IdempotencyKeyReused      the key was used before for a different message
    ├── TooBusy                   a configured concurrency limit is reached; try again later
    └── Unavailable               the store is not open (starting up or shutting down)
"""


class BackchannelError(Exception):
    kind = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(BackchannelError):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class IdempotencyKeyReused(BackchannelError):
    kind = "idempotency-key-reused"


class TooBusy(BackchannelError):
    kind = "too-busy"


class Unavailable(BackchannelError):
    kind = "unavailable"
