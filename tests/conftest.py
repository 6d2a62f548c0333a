"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny models: one intra-op thread is much faster than contended threads on a shared CPU.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
