"""Fixtures shared by several test modules (module-specific helpers live in tests/helpers/)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores, oversubscribed threads make tiny ops 100x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
