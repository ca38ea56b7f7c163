"""Eval tests run on one torch thread: their tensors are tiny, so a thread pool only adds hand-off cost,
and on a shared, oversubscribed machine each parallel op can stall for milliseconds."""
import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
