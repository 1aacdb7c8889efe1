"""Helpers shared by the Triton launchers: device context, tiling, dtype maps. (Their
argument checks are qlora_kernels/op_checks.py, shared with the reference.)

Example:
    >>> import torch
    >>> from qlora_kernels.triton._common import flat
    >>> flat(torch.zeros(2, 2)).shape
    torch.Size([4])
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..formats import FLOAT_DTYPES, NESTED_BLOCKSIZE, check_blocksize


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_elements(gpu: int) -> int:
    """Elements per program: ``gpu`` on a GPU (sized for registers); 8x that under the
    interpreter, whose cost is per interpreted op, not per element, so fewer and larger
    programs keep the CPU tests fast (same results: the tiling never changes a value)."""
    return gpu * 8 if interpreting() else gpu


def on_device(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current one, so Triton launches on it (and on
    that device's current stream); a no-op for CPU tensors (the interpreter).

    Example:
        >>> with on_device(torch.zeros(1)):
        ...     pass
    """
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def flat(t):
    """Contiguous flat view (a copy only when ``t`` is not contiguous); None stays None.

    Example:
        >>> flat(torch.zeros(2, 3)).shape
        torch.Size([6])
    """
    return None if t is None else t.reshape(-1).contiguous()


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1).

    Example:
        >>> next_pow2(100)
        128
    """
    return 1 << max(0, int(n) - 1).bit_length()
