"""Every route of the HTTP API, declared in one place: the hub's ServeMux.

With auth on, every route needs a token unless it is declared ``public``; each endpoint then
checks what the token grants (docs/auth.md, "What each route needs"). A route declared with a
``setting`` exists only in hubs whose settings turn it on: :func:`serve_mux` builds an app's
ServeMux from the routes its settings enable.
"""

from __future__ import annotations

from . import channels, jobs, meta, sse, websocket
from .config import Settings
from .router import Route, ServeMux

ROUTES = [
    Route("POST", "/v1/channels/{channel}/messages", channels.publish, "Publish one message"),
    Route(
        "GET",
        "/v1/channels/{channel}/messages",
        channels.poll,
        "Read messages after a cursor: short poll, or long poll with wait=",
    ),
    Route(
        "GET",
        "/v1/channels/{channel}/events",
        sse.channel_events,
        "Server-sent events of one channel, resumable with Last-Event-ID or after=",
        token_in_query=True,
    ),
    Route(
        "GET",
        "/v1/events",
        sse.multi_events,
        "Server-sent events of several channels: ?channel=a&channel=b",
        token_in_query=True,
    ),
    Route(
        "GET",
        "/v1/channels/{channel}",
        channels.channel_info,
        "Channel info: last id, retained count, retention, subscribers",
    ),
    Route(
        "PUT",
        "/v1/channels/{channel}",
        channels.configure_channel,
        "Set or clear the channel's own retention policy",
    ),
    Route(
        "POST",
        "/v1/queues/{queue}/jobs",
        jobs.submit,
        "Submit a job: 202 with Location, or 200 with the result under Prefer: wait=N",
    ),
    Route(
        "POST",
        "/v1/queues/{queue}/jobs/batch",
        jobs.submit_batch,
        "Submit many jobs in one request; an outcome per job",
    ),
    # /v1/jobs/events shadows /v1/jobs/{job}: the most specific pattern owns a path.
    Route(
        "GET",
        "/v1/jobs/events",
        jobs.jobs_events,
        "Server-sent events of many jobs (?id=A&id=B): their final states, or every change",
        token_in_query=True,
    ),
    Route(
        "POST",
        "/v1/jobs/events",
        jobs.jobs_events_of_body,
        'Server-sent events of many jobs named in the body {"ids": [...]}',
    ),
    Route("GET", "/v1/jobs/{job}", jobs.get_job, "A job: short poll, or long poll with wait="),
    Route(
        "GET",
        "/v1/jobs/{job}/events",
        jobs.job_events,
        "Server-sent events of the job's progress and final state, resumable by version",
        token_in_query=True,
    ),
    Route(
        "DELETE",
        "/v1/jobs/{job}",
        jobs.cancel_job,
        "Cancel: a queued job never runs, a running one is asked to stop",
    ),
    Route(
        "POST",
        "/v1/queues/{queue}/claim",
        jobs.claim,
        "Workers: take the next job with a lease, waiting up to wait= seconds",
    ),
    Route(
        "POST",
        "/v1/queues/{queue}/results",
        jobs.finish_batch,
        "Workers: complete or fail many jobs in one request; an outcome per job",
    ),
    Route("POST", "/v1/jobs/{job}/heartbeat", jobs.heartbeat, "Workers: extend the lease"),
    Route("POST", "/v1/jobs/{job}/progress", jobs.progress, "Workers: report progress"),
    Route("POST", "/v1/jobs/{job}/complete", jobs.complete, "Workers: finish with a result"),
    Route(
        "POST",
        "/v1/jobs/{job}/fail",
        jobs.fail,
        "Workers: give up on an attempt (retried until max_attempts) or on the job",
    ),
    Route("GET", "/healthz", meta.healthz, "Liveness: the process answers", public=True),
    Route("GET", "/readyz", meta.readyz, "Readiness: the store answers", public=True),
    Route(
        "GET",
        "/openapi.json",
        meta.openapi,
        "This API as an OpenAPI 3.1 document",
        public=True,
    ),
    Route("GET", "/docs", meta.docs, "The OpenAPI document (HTML for browsers)", public=True),
    Route("GET", "/problems/{slug}", meta.problem_type, "What a problem type means", public=True),
    # WebSocket handshakes are routed like requests, under the pseudo-method WEBSOCKET.
    Route(
        "WEBSOCKET",
        "/v1/channels/{channel}/ws",
        websocket.channel_socket,
        "Messages of one channel, one JSON text frame each",
        token_in_query=True,
    ),
    Route(
        "WEBSOCKET",
        "/v1/ws",
        websocket.mux_socket,
        "The multiplexed protocol",
        token_in_query=True,
    ),
    Route(
        "WEBSOCKET",
        "/v1/echo",
        websocket.echo_socket,
        "Every message sent back unchanged: for conformance testing and debugging",
        token_in_query=True,
        setting="ws_echo",
    ),
]


def enabled(route: Route, settings: Settings) -> bool:
    """Does the route exist in a hub with these settings?"""
    return route.setting is None or getattr(settings, route.setting) is True


def serve_mux(settings: Settings) -> ServeMux:
    """The ServeMux of a hub with these settings: a route that is turned off is unknown, so
    its path answers as any unknown path does (404; a WebSocket handshake, 403)."""
    return ServeMux([route for route in ROUTES if enabled(route, settings)])
