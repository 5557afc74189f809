"""Settings and fixtures for the whole suite."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from .redis_server import RedisServer

# Hypothesis's per-example deadline is a timing threshold; on a shared, noisy machine it fails
# for reasons that have nothing to do with the code. Correctness is what the examples check.
settings.register_profile("backchannel", deadline=None, print_blob=True)
settings.load_profile("backchannel")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (no persistence) for every test that asks; each test keeps its
    keys under a fresh prefix (``redis_server.url_for()``)."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-rounds",
        type=int,
        default=3,
        help="how many times tests/reliability/test_crash.py kills and restarts the hub (3)",
    )
