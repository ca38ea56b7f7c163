"""Shared test configuration: marker skips and session-scoped synthetic datasets."""
import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI: pip install 'densevid[gpu]'")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "dali" in item.keywords and not has_dali:
            item.add_marker(skip_dali)
