"""Shared set-up for every test: tests use tiny models, and pytest-xdist runs one worker per core."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: intra-op threads only add contention (10-50x slower on a busy 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
