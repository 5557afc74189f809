"""The process ``backchannel serve`` runs tunes CPython's garbage collector (server/run.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from backchannel.server.run import FULL_COLLECTION_EVERY, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_full_collections_rarer() -> None:
    young, middle, full = gc.get_threshold()
    gc.unfreeze()
    tune_gc()
    assert gc.get_freeze_count() > 10_000  # the modules and classes imported so far
    assert gc.get_threshold() == (young, middle, FULL_COLLECTION_EVERY)
    assert full < FULL_COLLECTION_EVERY
