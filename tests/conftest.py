"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tests run faster on one thread on a shared machine; the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
