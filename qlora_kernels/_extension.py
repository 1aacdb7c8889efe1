"""Loads the compiled ``qlora_kernels._C`` tolerantly.

When the extension is missing or fails to load, one warning is issued and the package
falls back to the pure-PyTorch reference ops (registered under the same op names by
``qlora_kernels.ops``), so ``import qlora_kernels`` never fails for want of a build.
"""
from __future__ import annotations

import os
import warnings

import torch

EXTENSION_LOADED = False
LOAD_ERROR: str | None = None

if os.environ.get("QLORA_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
    LOAD_ERROR = "disabled by QLORA_KERNELS_NO_EXTENSION"
else:
    try:
        from . import _C  # noqa: F401  (registers the ops through static initializers)

        EXTENSION_LOADED = True
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "qlora_kernels: compiled extension qlora_kernels._C not available "
            f"({LOAD_ERROR}); using the pure-PyTorch reference ops. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``qlora_kernels::<op>`` has a kernel registered for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora_kernels::{op}", dispatch_key)


# Read before qlora_kernels.ops registers its Triton/reference stand-ins for CUDA tensors,
# which would otherwise make the check below true on a CPU-only build.
_CUDA_KERNELS_BUILT = EXTENSION_LOADED and has_kernel("dequantize_4bit", "CUDA")


def cuda_kernels_built() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _CUDA_KERNELS_BUILT
