"""The ServeMux on its own: matching, HEAD, 405s and which pattern owns a path."""

from __future__ import annotations

from backchannel.server.router import Matched, NoRoute, Route, ServeMux


async def _endpoint(request: object) -> None:
    return None


def mux(*declared: tuple[str, str]) -> ServeMux:
    return ServeMux([Route(method, path, _endpoint, "") for method, path in declared])


JOBS = mux(
    ("GET", "/v1/jobs/{job}"),
    ("DELETE", "/v1/jobs/{job}"),
    ("GET", "/v1/jobs/events"),
    ("POST", "/v1/jobs/events"),
)


def test_placeholders_match_one_decoded_segment() -> None:
    found = JOBS.match("DELETE", "/v1/jobs/a%2Fb")
    assert isinstance(found, Matched) and found.params == {"job": "a/b"}


def test_a_literal_segment_owns_its_path_for_every_method() -> None:
    found = JOBS.match("POST", "/v1/jobs/events")
    assert isinstance(found, Matched) and found.route.path == "/v1/jobs/events"
    # Not a cancel of a job called "events": the literal pattern shadows the placeholder.
    refused = JOBS.match("DELETE", "/v1/jobs/events")
    assert refused == NoRoute(("GET", "HEAD", "POST"))


def test_head_is_get_and_405_lists_each_method_once() -> None:
    assert isinstance(JOBS.match("HEAD", "/v1/jobs/abc"), Matched)
    assert JOBS.match("PUT", "/v1/jobs/abc") == NoRoute(("GET", "HEAD", "DELETE"))
    assert JOBS.match("GET", "/v1/nothing") == NoRoute(())
