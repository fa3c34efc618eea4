"""The app's lifespan: what start-up leaves behind for the process's lifetime."""

from __future__ import annotations

import gc

import pytest
from support import started_app

from hero_service.config import Settings


@pytest.mark.anyio
async def test_the_heap_loaded_at_start_up_is_frozen_out_of_the_cyclic_gc_while_serving():
    """A full collection walks every tracked object with the GIL held (250 ms for the ~450k
    objects torch, transformers and the model leave here: the forward and every request
    stall). Frozen after start-up, the collector's generations hold only what serving makes;
    shutting down gives the objects back to it."""
    assert gc.get_freeze_count() == 0
    async with started_app(Settings(verifier_workers=1)):
        frozen = gc.get_freeze_count()
        assert frozen > 100_000  # the loaded libraries and the model
        assert len(gc.get_objects()) < frozen / 10  # what a full collection still walks
    assert gc.get_freeze_count() == 0
