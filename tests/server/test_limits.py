"""The connection limit's arithmetic (the behaviour is tested against a real hub in
tests/reliability/test_malformed_http.py)."""

import resource

from backchannel.server.limits import (
    HEADROOM,
    MIN_CONNECTIONS,
    ConnectionLimit,
    derived_max_connections,
    raise_file_limit,
)


def test_derived_limit_leaves_headroom() -> None:
    assert derived_max_connections(256) == 256 - HEADROOM
    assert derived_max_connections(1_048_576) == 1_048_576 - HEADROOM
    assert derived_max_connections(100) == MIN_CONNECTIONS
    assert derived_max_connections(0) > 1_000_000  # no limit to read


def test_raise_file_limit_reaches_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert raise_file_limit() == (soft if hard == resource.RLIM_INFINITY else hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_full_counts_every_source_and_pending() -> None:
    http, tcp = {1, 2}, {3}
    limit = ConnectionLimit(4)
    limit.track(http)
    limit.track(tcp)
    assert limit.open() == 3 and not limit.full() and not limit.full(pending=1)
    assert limit.full(pending=2) and limit.refused == 1
    http.add(4)
    http.add(5)
    assert limit.full() and limit.refused == 2


def test_lingering_refusals_are_bounded() -> None:
    limit = ConnectionLimit(1, max_lingering=2)
    assert limit.linger() and limit.linger() and not limit.linger()
    limit.lingered()
    assert limit.linger()
