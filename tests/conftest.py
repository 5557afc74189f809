"""Settings for the whole suite."""

import pytest
from hypothesis import settings

# Hypothesis's per-example deadline is a timing threshold; on a shared, noisy machine it fails
# for reasons that have nothing to do with the code. Correctness is what the examples check.
settings.register_profile("backchannel", deadline=None, print_blob=True)
settings.load_profile("backchannel")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-rounds",
        type=int,
        default=3,
        help="how many times tests/reliability/test_crash.py kills and restarts the hub (3)",
    )
