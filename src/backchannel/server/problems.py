"""Problem details (RFC 9457): every error the HTTP API returns, in one table.

A problem's ``type`` is the relative URI ``/problems/{slug}``; the hub serves a description of
each type at that path, so a ``type`` resolved against the hub's address is a working link.
Slugs are stable: clients may branch on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from ..core.errors import BackchannelError, TooBusy, Unavailable

log = logging.getLogger("backchannel.server")


@dataclass(frozen=True, slots=True)
class ProblemType:
    slug: str
    status: int
    title: str
    description: str

    @property
    def uri(self) -> str:
        return f"/problems/{self.slug}"


_TYPES = [
    ProblemType(
        "invalid-channel",
        400,
        "Invalid channel name",
        "Channel names are 1 to 200 characters: ASCII letters, digits and _ - . : @",
    ),
    ProblemType(
        "invalid-cursor",
        400,
        "Invalid cursor",
        "`after` takes a message id: 1 to 16 hexadecimal digits, at most 7fffffffffffffff.",
    ),
    ProblemType(
        "invalid-parameter",
        400,
        "Invalid query parameter",
        "A query parameter does not parse, or is given more than once.",
    ),
    ProblemType(
        "limit-out-of-range",
        400,
        "Limit out of range",
        "`limit` must be between 1 and the server's max_limit.",
    ),
    ProblemType(
        "wait-out-of-range",
        400,
        "Wait out of range",
        "`wait` must be between 0 and the server's max_wait seconds.",
    ),
    ProblemType(
        "malformed-json",
        400,
        "Malformed JSON",
        "The body was declared as JSON but does not parse as JSON.",
    ),
    ProblemType(
        "invalid-text", 400, "Invalid text", "The body was declared as text but is not valid UTF-8."
    ),
    ProblemType(
        "invalid-idempotency-key",
        400,
        "Invalid Idempotency-Key",
        "An Idempotency-Key is 1 to 255 visible ASCII characters.",
    ),
    ProblemType(
        "invalid-retention",
        400,
        "Invalid retention",
        "A retention policy has max_count between 1 and 1,000,000,000 and max_age between "
        '1 second and 10 years; a PUT body is exactly {"retention": {...}} or '
        '{"retention": null}.',
    ),
    ProblemType("not-found", 404, "Not found", "No route matches this path."),
    # Requests refused before they reach a route (backchannel.server.protocol): the hub closes
    # the connection after each of these.
    ProblemType(
        "malformed-request",
        400,
        "Malformed request",
        "The request is not valid HTTP/1.1: a bad request line, header, or chunked body.",
    ),
    ProblemType(
        "request-timeout",
        408,
        "Request timeout",
        "The request line and headers did not arrive within header_timeout seconds.",
    ),
    ProblemType(
        "request-head-too-large",
        431,
        "Request head too large",
        "The request line and headers are larger than max_header_bytes.",
    ),
    ProblemType(
        "too-many-connections",
        503,
        "Too many connections",
        "The hub has max_connections connections open. Retry after the number of seconds in "
        "Retry-After; on TCP, reconnect later.",
    ),
    # Push protocols (docs/protocol.md): answers to WebSocket and TCP commands, and the reasons
    # a connection is closed.
    ProblemType(
        "invalid-command",
        400,
        "Invalid command",
        "A WebSocket or TCP command lacks a field, has one of the wrong type, or names an "
        "unknown op.",
    ),
    ProblemType(
        "already-subscribed",
        409,
        "Already subscribed",
        "This connection is already subscribed to the channel.",
    ),
    ProblemType(
        "not-subscribed",
        404,
        "Not subscribed",
        "This connection is not subscribed to the channel.",
    ),
    ProblemType(
        "too-many-subscriptions",
        429,
        "Too many subscriptions",
        "The connection has as many subscriptions as max_subscriptions allows.",
    ),
    ProblemType(
        "protocol-error",
        400,
        "Protocol error",
        "A TCP frame is malformed, of an unknown type, or not allowed at this point of the "
        "connection. The hub closes the connection.",
    ),
    ProblemType(
        "frame-too-large",
        413,
        "Frame too large",
        "A TCP frame is larger than the max_frame the hub announced. The hub closes the "
        "connection.",
    ),
    ProblemType(
        "unsupported-version",
        400,
        "Unsupported protocol version",
        "The client's HELLO offers no protocol version the hub speaks.",
    ),
    ProblemType(
        "slow-consumer",
        503,
        "Slow consumer",
        "The connection fell more than max_outbound_bytes behind. Reconnect and resume from "
        "the last message received.",
    ),
    ProblemType(
        "shutting-down",
        503,
        "Shutting down",
        "The hub is stopping. Reconnect (to it or another node) and resume.",
    ),
    ProblemType(
        "method-not-allowed",
        405,
        "Method not allowed",
        "The path exists but does not take this method; see the Allow header.",
    ),
    ProblemType(
        "job-not-found",
        404,
        "Job not found",
        "No job has this id, or it finished longer ago than the job retention.",
    ),
    ProblemType(
        "lease-lost",
        409,
        "Lease lost",
        "The job is not running under this lease any more: the lease expired (the job went "
        "back to the queue or to another worker) or the job finished.",
    ),
    ProblemType(
        "job-finished",
        409,
        "Job finished",
        "The job has already finished: it cannot be cancelled.",
    ),
    ProblemType(
        "invalid-job",
        400,
        "Invalid job request",
        "A worker command lacks its lease or a field, or a lease or attempt count is out of range.",
    ),
    # Authentication and authorization (docs/auth.md). The 401s carry WWW-Authenticate.
    ProblemType(
        "token-required",
        401,
        "Token required",
        "The hub requires a bearer token: send Authorization: Bearer TOKEN, or ?token= on "
        "event streams and WebSockets (or an AUTH frame on TCP).",
    ),
    ProblemType(
        "invalid-token",
        401,
        "Invalid token",
        "The token is malformed, uses an algorithm the hub does not accept, does not verify "
        "with the hub's keys, is not valid yet (nbf), names another audience or issuer, has "
        "no exp, or has a malformed bc claim.",
    ),
    ProblemType(
        "token-expired",
        401,
        "Token expired",
        "The token's exp has passed. Get a new token and try again; a stream that ended "
        "because its token expired resumes from its last message id.",
    ),
    ProblemType(
        "forbidden",
        403,
        "Forbidden",
        "The token is valid but does not grant this: publish or subscribe on this channel, "
        "submit or claim on this queue, or admin.",
    ),
    ProblemType(
        "batch-too-large",
        413,
        "Batch too large",
        "A batch of jobs (submit, claim max=, results) has more items than job_max_batch, or "
        "a watch names more jobs than job_max_watch.",
    ),
    ProblemType(
        "origin-not-allowed",
        403,
        "Origin not allowed",
        "A browser page from another origin asked for an event stream; list its origin in "
        "allowed_origins to let it.",
    ),
    ProblemType(
        "idempotency-key-reused",
        422,
        "Idempotency-Key reused",
        "The key was used before, within its lifetime, for a different message on this "
        "channel. A retry must send the same body and content type.",
    ),
    ProblemType(
        "message-too-large",
        413,
        "Message too large",
        "The body is larger than the server's max_message_bytes.",
    ),
    ProblemType(
        "unsupported-media-type",
        415,
        "Unsupported media type",
        "The Content-Type is malformed, or names a charset other than UTF-8 for a JSON "
        "or text body.",
    ),
    ProblemType(
        "too-busy",
        503,
        "Too busy",
        "A concurrency limit (such as max_long_polls) is reached. Retry after the "
        "number of seconds in Retry-After.",
    ),
    ProblemType(
        "unavailable",
        503,
        "Unavailable",
        "The hub is starting, shutting down, or cannot reach its store.",
    ),
    ProblemType(
        "internal-error",
        500,
        "Internal error",
        "A bug in the hub. The log has the details; please report it.",
    ),
]

PROBLEM_TYPES: dict[str, ProblemType] = {t.slug: t for t in _TYPES}
CONTENT_TYPE = b"application/problem+json"


class HTTPProblem(Exception):
    """Raised by handlers to answer with a problem document."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(detail)
        self.type = PROBLEM_TYPES[slug]
        self.detail = detail
        self.headers = headers or []
        self.extra = extra

    def body(self, instance: str | None = None, root_path: str = "") -> bytes:
        doc: dict[str, object] = {
            "type": root_path + self.type.uri,
            "title": self.type.title,
            "status": self.type.status,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        doc.update(self.extra)
        return orjson.dumps(doc)


def problem_for(exc: BackchannelError) -> HTTPProblem:
    """The problem a domain error stands for, on every transport: its ``kind`` is a slug of
    :data:`PROBLEM_TYPES`. Refusals for load or availability ask to come back in a second."""
    if exc.kind not in PROBLEM_TYPES:
        log.error("no problem type for %r", exc)
        return HTTPProblem("internal-error", "the hub failed to answer; see its log")
    headers = [(b"retry-after", b"1")] if isinstance(exc, TooBusy | Unavailable) else None
    return HTTPProblem(exc.kind, exc.detail, headers=headers)
