"""The OpenAPI 3.1 document of the HTTP API, built from the route table and the settings."""

from __future__ import annotations

from typing import Any

from .. import __version__
from .config import Settings
from .problems import PROBLEM_TYPES
from .routes import ROUTES, enabled

ID_PATTERN = "^[0-9a-fA-F]{1,16}$"
CHANNEL_PATTERN = "^[A-Za-z0-9_\\-.:@]{1,200}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problems(*slugs: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for slug in slugs:
        status = str(PROBLEM_TYPES[slug].status)
        entry = out.setdefault(
            status,
            {
                "description": "",
                "content": {"application/problem+json": {"schema": _ref("Problem")}},
            },
        )
        entry["description"] = ", ".join(filter(None, [entry["description"], slug]))
    return out


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
}


def build(settings: Settings) -> dict[str, Any]:
    channel = {
        "name": "channel",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": CHANNEL_PATTERN},
    }
    details: dict[tuple[str, str], dict[str, Any]] = {
        ("POST", "/v1/channels/{channel}/messages"): {
            "parameters": [
                channel,
                IDEMPOTENCY_KEY,
            ],
            "requestBody": {
                # An empty body is a message too: zero bytes of application/octet-stream.
                "required": False,
                "description": "The message, kept exactly as sent with its content type. "
                "No body publishes an empty application/octet-stream message.",
                "content": {
                    "application/json": {"schema": {}},
                    "text/plain": {"schema": {"type": "string"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "201": _json(
                    _ref("Published"),
                    "Stored; or the earlier result for a repeated "
                    "Idempotency-Key (header Idempotent-Replayed: true)",
                ),
                **_problems(
                    "invalid-channel",
                    "malformed-json",
                    "invalid-text",
                    "invalid-idempotency-key",
                    "message-too-large",
                    "unsupported-media-type",
                    "idempotency-key-reused",
                    "unavailable",
                ),
            },
        },
        ("GET", "/v1/channels/{channel}/messages"): {
            "parameters": [
                channel,
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "description": "Cursor: the id of the last message seen. Absent or 0: from the "
                    "oldest retained message.",
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": settings.max_limit,
                        "default": settings.default_limit,
                    },
                },
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "description": "Long poll: seconds to wait for a first new message.",
                    "schema": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": settings.max_wait,
                        "default": 0,
                    },
                },
            ],
            "responses": {
                "200": _json(_ref("Page"), "Messages after the cursor, oldest first"),
                **_problems(
                    "invalid-channel",
                    "invalid-cursor",
                    "invalid-parameter",
                    "limit-out-of-range",
                    "wait-out-of-range",
                    "too-busy",
                ),
            },
        },
        ("GET", "/v1/channels/{channel}/events"): {
            "parameters": [
                channel,
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "description": "Replay the messages after this id first. Without it (and "
                    "without Last-Event-ID) the stream starts with the next message.",
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "Sent by browsers when they reconnect; wins over after.",
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                },
            ],
            "responses": {
                "200": {
                    "description": "An endless text/event-stream: one event per message",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **_problems("invalid-channel", "invalid-cursor", "unavailable"),
            },
        },
        ("GET", "/v1/events"): {
            "parameters": [
                {
                    "name": "channel",
                    "in": "query",
                    "required": True,
                    "description": "A channel to stream; repeat for more (at most 48).",
                    "schema": {
                        "type": "array",
                        "items": {"type": "string", "pattern": CHANNEL_PATTERN},
                    },
                    "style": "form",
                    "explode": True,
                },
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "description": "Composite position channel=HEX,channel=HEX, as in event ids.",
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": {
                    "description": "An endless text/event-stream of every named channel",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **_problems(
                    "invalid-channel", "invalid-cursor", "invalid-parameter", "unavailable"
                ),
            },
        },
        ("GET", "/v1/channels/{channel}"): {
            "parameters": [channel],
            "responses": {
                "200": _json(_ref("ChannelInfo"), "The channel (every valid name exists)"),
                **_problems("invalid-channel"),
            },
        },
        ("PUT", "/v1/channels/{channel}"): {
            "parameters": [channel],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["retention"],
                            "properties": {
                                "retention": {"oneOf": [{"type": "null"}, _ref("Retention")]}
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(_ref("ChannelInfo"), "The channel with its new policy"),
                **_problems(
                    "invalid-channel", "malformed-json", "invalid-retention", "message-too-large"
                ),
            },
        },
        ("GET", "/healthz"): {"responses": {"200": _json({"type": "object"}, "Alive")}},
        ("GET", "/readyz"): {
            "responses": {"200": _json({"type": "object"}, "Ready"), **_problems("unavailable")}
        },
        ("GET", "/openapi.json"): {
            "responses": {"200": _json({"type": "object"}, "This document")}
        },
        ("GET", "/docs"): {
            "responses": {
                "200": {
                    "description": "This document, or an HTML page when Accept asks for text/html",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/html": {"schema": {"type": "string"}},
                    },
                }
            }
        },
        ("GET", "/problems/{slug}"): {
            "parameters": [
                {"name": "slug", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": _json({"type": "object"}, "The problem type"),
                **_problems("not-found"),
            },
        },
    }
    job_param = {
        "name": "job",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    }
    queue_param = dict(channel, name="queue")
    job_wait = {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "Seconds to wait; a longer wait is shortened to max_wait "
        f"({settings.max_wait:g})",
        "schema": {"type": "number", "minimum": 0},
    }
    job_ok = _json(_ref("Job"), "The job")

    def worker_body(required: list[str], **properties: Any) -> dict[str, Any]:
        return {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["lease", *required],
                        "properties": {"lease": {"type": "string"}, **properties},
                    }
                }
            },
        }

    worker_bodies = {
        "heartbeat": worker_body(
            [],
            extend={
                "type": ["number", "null"],
                "minimum": 1,
                "maximum": settings.job_max_lease,
            },
        ),
        "progress": worker_body(["progress"], progress={}),
        "complete": worker_body(["result"], result={}),
        "fail": worker_body([], error={"type": "string"}, retry={"type": "boolean"}),
    }
    worker_problems = _problems("job-not-found", "lease-lost", "invalid-job", "malformed-json")
    job_details: dict[tuple[str, str], dict[str, Any]] = {
        ("POST", "/v1/queues/{queue}/jobs"): {
            "parameters": [
                queue_param,
                {
                    "name": "Prefer",
                    "in": "header",
                    "required": False,
                    "description": "wait=N: answer 200 with the finished job if it ends in N s",
                    "schema": {"type": "string"},
                },
                IDEMPOTENCY_KEY,
                {
                    "name": "max_attempts",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                },
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
            "responses": {
                "200": job_ok,
                "202": _json(_ref("Job"), "Accepted: poll its Location"),
                **_problems(
                    "invalid-channel",
                    "malformed-json",
                    "message-too-large",
                    "unsupported-media-type",
                    "invalid-job",
                    "invalid-idempotency-key",
                    "idempotency-key-reused",
                ),
            },
        },
        ("GET", "/v1/jobs/{job}"): {
            "parameters": [
                job_param,
                job_wait,
                {
                    "name": "version",
                    "in": "query",
                    "required": False,
                    "description": "With wait: answer once the job's version passes this one.",
                    # query_whole: at most 12 digits
                    "schema": {"type": "integer", "minimum": 0, "maximum": 999_999_999_999},
                },
            ],
            "responses": {
                "200": job_ok,
                **_problems("job-not-found", "invalid-parameter", "wait-out-of-range"),
            },
        },
        ("DELETE", "/v1/jobs/{job}"): {
            "parameters": [job_param],
            "responses": {"200": job_ok, **_problems("job-not-found", "job-finished")},
        },
        ("POST", "/v1/queues/{queue}/claim"): {
            "parameters": [
                queue_param,
                job_wait,
                {
                    "name": "lease",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "number",
                        "minimum": 1,
                        "maximum": settings.job_max_lease,
                    },
                },
            ],
            "responses": {
                "200": job_ok,
                "204": {"description": "No job came in time"},
                **_problems("invalid-channel", "invalid-job", "wait-out-of-range"),
            },
        },
    }
    job_details[("POST", "/v1/queues/{queue}/claim")]["responses"].update(
        _problems("batch-too-large")
    )
    job_details[("POST", "/v1/queues/{queue}/claim")]["parameters"].append(
        {
            "name": "max",
            "in": "query",
            "required": False,
            "description": 'A batch: up to this many jobs, answered as {"jobs": [...]} '
            "(200, empty when none came in time) instead of one job or 204.",
            "schema": {"type": "integer", "minimum": 1, "maximum": settings.job_max_batch},
        }
    )
    job_details[("POST", "/v1/queues/{queue}/claim")]["responses"]["200"] = _json(
        # anyOf: a Job has no required fields, so {"jobs": [...]} is one as well.
        {"anyOf": [_ref("Job"), _ref("ClaimedJobs")]},
        "The job; with max=, the jobs",
    )
    batch_problems = _problems(
        "invalid-channel",
        "malformed-json",
        "invalid-job",
        "message-too-large",
        "batch-too-large",
        "unsupported-media-type",
    )
    job_details[("POST", "/v1/queues/{queue}/jobs/batch")] = {
        "parameters": [queue_param],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("JobBatch")}},
        },
        "responses": {
            "200": _json(_ref("SubmittedJobs"), "An outcome per job, in order"),
            **batch_problems,
        },
    }
    job_details[("POST", "/v1/queues/{queue}/results")] = {
        "parameters": [queue_param],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("ResultBatch")}},
        },
        "responses": {
            "200": _json(_ref("FinishedJobs"), "An outcome per job, in order"),
            **batch_problems,
        },
    }
    watch_problems = ("invalid-job", "invalid-parameter", "batch-too-large", "origin-not-allowed")
    many_events = {
        "description": "An event per job once it has finished (or per change with "
        "changes=all); event: problem for an id with no job; ends after the last",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    changes_param = {
        "name": "changes",
        "in": "query",
        "required": False,
        "schema": {"enum": ["final", "all"], "default": "final"},
    }
    job_details[("GET", "/v1/jobs/events")] = {
        "parameters": [
            {
                "name": "id",
                "in": "query",
                "required": True,
                "description": "A job id; repeat for more (a query takes at most 50 "
                "parameters: POST for more).",
                "schema": {"type": "array", "items": {"type": "string"}},
                "style": "form",
                "explode": True,
            },
            changes_param,
        ],
        "responses": {"200": many_events, **_problems(*watch_problems, "too-busy")},
    }
    job_details[("POST", "/v1/jobs/events")] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["ids"],
                        "properties": {
                            "ids": {
                                "type": "array",
                                "items": {"type": "string"},
                                "maxItems": settings.job_max_watch,
                            },
                            "changes": {"enum": ["final", "all"], "default": "final"},
                        },
                    }
                }
            },
        },
        "responses": {
            "200": many_events,
            **_problems(*watch_problems, "too-busy", "malformed-json", "message-too-large"),
        },
    }
    job_details[("GET", "/v1/jobs/{job}/events")] = {
        "parameters": [
            job_param,
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume after this job version.",
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "200": {
                "description": "One event per job version, ending after the final state",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_problems("job-not-found", "invalid-cursor"),
        },
    }
    for action in ("heartbeat", "progress", "complete", "fail"):
        job_details[("POST", f"/v1/jobs/{{job}}/{action}")] = {
            "parameters": [job_param],
            "requestBody": worker_bodies[action],
            "responses": {"200": job_ok, **worker_problems},
        }
    details.update(job_details)
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        if route.method == "WEBSOCKET":  # OpenAPI does not describe WebSockets: protocol.md does
            continue
        if not enabled(route, settings):
            continue
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.endpoint.__name__,
        }
        operation.update(details[(route.method, route.path)])
        if settings.auth_configured and not route.public:
            # docs/auth.md: every route but the public ones takes a bearer token.
            operation["security"] = [{"bearer": []}]
            operation["responses"] = {
                **operation["responses"],
                **_problems("token-required", "invalid-token", "token-expired", "forbidden"),
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation

    message = {
        "type": "object",
        "required": ["id", "channel", "time", "content_type", "encoding", "data"],
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN},
            "channel": {"type": "string"},
            "time": {"type": "string", "format": "date-time"},
            "content_type": {"type": "string"},
            "encoding": {"enum": ["json", "text", "base64"]},
            "data": {"description": "The JSON value, the text, or the bytes in base64"},
        },
    }
    security_schemes = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A JWT whose bc claim grants the action (docs/auth.md). Event "
            "streams and WebSockets also take it as ?token=.",
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "backchannel",
            "version": __version__,
            "description": "Channels on a durable log: publish, short poll, long poll.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Message": message,
                "Page": {
                    "type": "object",
                    "required": ["messages", "next_after"],
                    "properties": {
                        "messages": {"type": "array", "items": _ref("Message")},
                        "next_after": {"type": "string", "pattern": ID_PATTERN},
                    },
                },
                "Published": {
                    "type": "object",
                    "required": ["id", "channel", "time"],
                    "properties": {
                        "id": {"type": "string", "pattern": ID_PATTERN},
                        "channel": {"type": "string"},
                        "time": {"type": "string", "format": "date-time"},
                    },
                },
                "Retention": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        # null, like a missing field, follows the server's default.
                        "max_count": {
                            "type": ["integer", "null"],
                            "minimum": 1,
                            "maximum": 1_000_000_000,
                        },
                        "max_age": {
                            "type": ["number", "null"],
                            "minimum": 1,
                            "maximum": 10 * 365 * 86400,
                        },
                    },
                },
                "ChannelInfo": {
                    "type": "object",
                    "properties": {
                        "channel": {"type": "string"},
                        "last_id": {"type": "string", "pattern": ID_PATTERN},
                        "first_id": {"type": ["string", "null"]},
                        "retained": {"type": "integer"},
                        "retention": _ref("Retention"),
                        "subscribers": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                    },
                },
                "Job": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "queue": {"type": "string"},
                        "state": {"enum": ["queued", "running", "succeeded", "cancelled", "dead"]},
                        "attempts": {"type": "integer"},
                        "max_attempts": {"type": "integer"},
                        "created": {"type": "string"},
                        "updated": {"type": "string"},
                        "version": {"type": "integer"},
                        "payload": {},
                        "progress": {},
                        "result": {},
                        "error": {"type": ["string", "null"]},
                        "cancel_requested": {"type": "boolean"},
                        "lease": {"type": ["string", "null"]},
                        "lease_expires": {"type": ["string", "null"]},
                    },
                },
                "ClaimedJobs": {
                    "type": "object",
                    "required": ["jobs"],
                    "properties": {"jobs": {"type": "array", "items": _ref("Job")}},
                },
                "JobBatch": {
                    "type": "object",
                    "required": ["jobs"],
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "maxItems": settings.job_max_batch,
                            # Any item is taken: one that is not a valid job gets its own
                            # problem in the answer, and the others go ahead.
                            "items": {
                                "description": 'A job: {"payload": any JSON, '
                                '"idempotency_key": string, "max_attempts": 1 to 100}; an '
                                "item that is not one gets a problem in its place in the answer",
                                "example": {"payload": {"video": 42}, "idempotency_key": "v42"},
                            },
                        }
                    },
                },
                "SubmittedJobs": {
                    "type": "object",
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {
                                    "status": {"type": "integer"},
                                    "job": _ref("Job"),
                                    "replayed": {"type": "boolean"},
                                    "problem": _ref("Problem"),
                                },
                            },
                        }
                    },
                },
                "ResultBatch": {
                    "type": "object",
                    "required": ["results"],
                    "properties": {
                        "results": {
                            "type": "array",
                            "maxItems": settings.job_max_batch,
                            "items": {
                                "description": 'An outcome: {"id", "lease", "result": any '
                                'JSON} or {"id", "lease", "error": string, "retry": boolean '
                                "(default true)}; an item that is not one gets a problem in its "
                                "place in the answer",
                                "example": {"id": "…", "lease": "…", "result": {"ok": True}},
                            },
                        }
                    },
                },
                "FinishedJobs": {
                    "type": "object",
                    "properties": {
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["id", "status"],
                                "properties": {
                                    "id": {"type": ["string", "null"]},
                                    "status": {"type": "integer"},
                                    "state": {
                                        "enum": [
                                            "queued",
                                            "running",
                                            "succeeded",
                                            "cancelled",
                                            "dead",
                                        ]
                                    },
                                    "version": {"type": "integer"},
                                    "problem": _ref("Problem"),
                                },
                            },
                        }
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                },
            },
            **({"securitySchemes": security_schemes} if settings.auth_configured else {}),
        },
    }
