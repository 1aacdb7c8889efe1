"""Test configuration shared by every test module.

Without a GPU, Triton kernels run through Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, at collection time.
"""
import os
import shutil
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


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread, restoring the count afterwards. For tests of
    tiny layers: on a loaded 2-core machine intra-op threads only add synchronisation waits
    (a 2-layer toy Llama forward measured 50x slower with 2 threads than with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the one Triton's wheel ships ("" if none)."""
    cands = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    for cand in cands:
        if cand and os.access(cand, os.X_OK):
            return cand
    return ""
