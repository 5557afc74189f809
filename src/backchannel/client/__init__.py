"""The client SDK: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio) twins."""

from ._base import DEFAULT_URL, VIAS
from .aio import AsyncClient, AsyncSubscription
from .errors import (
    CircuitOpen,
    ClientError,
    Forbidden,
    HubError,
    HubTimeout,
    HubUnreachable,
    ProtocolViolation,
    Unauthorized,
)
from .jobs import (
    AsyncJobHandle,
    Completion,
    Failure,
    Finished,
    Job,
    JobBatchError,
    JobFailed,
    JobHandle,
)
from .models import Message, Page, Published
from .resilience import BreakerState, CircuitBreaker, Resilience, RetryPolicy
from .sync import Client, Subscription
from .worker import JobContext, Worker

__all__ = [
    "DEFAULT_URL",
    "VIAS",
    "AsyncClient",
    "AsyncJobHandle",
    "AsyncSubscription",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "Client",
    "ClientError",
    "Completion",
    "Failure",
    "Finished",
    "Forbidden",
    "HubError",
    "HubTimeout",
    "HubUnreachable",
    "Job",
    "JobBatchError",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "Message",
    "Page",
    "ProtocolViolation",
    "Published",
    "Resilience",
    "RetryPolicy",
    "Subscription",
    "Unauthorized",
    "Worker",
]
