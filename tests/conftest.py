"""Test configuration shared by every test module.

Without a GPU, Triton kernels run through Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, at collection time.
"""
import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_SIZES = (1, 63, 65, 333 * 77)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    """A fresh torch.Generator seeded per test (reproducible but distinct across tests)."""
    g = torch.Generator().manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    return g
