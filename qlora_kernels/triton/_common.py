"""Helpers shared by the Triton launchers: device context, argument checks, dtype maps.

Kernels never see a bad argument: every check that the C++ kernels make with TORCH_CHECK
is made here first, with the same wording, so that all backends fail the same way.

Example:
    >>> import torch
    >>> from qlora_kernels.triton._common import check_float_input
    >>> check_float_input(torch.zeros(2), "quantize_4bit")
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


def check_float_input(A: torch.Tensor, what: str) -> None:
    """Raise TypeError unless ``A`` is float32, float16 or bfloat16.

    Example:
        >>> check_float_input(torch.ones(1, dtype=torch.bfloat16), "quantize_4bit")
    """
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: input must be float32, float16 or bfloat16, got {A.dtype}")


def check_code(code: torch.Tensor, n: int, what: str) -> None:
    """Raise ValueError unless ``code`` is a float32 table of ``n`` values.

    Example:
        >>> check_code(torch.zeros(16), 16, "dequantize_4bit")
    """
    if code.dtype != torch.float32 or code.numel() != n:
        raise ValueError(f"{what}: code must be a float32 tensor of {n} values")


def check_same_device(what: str, *tensors) -> None:
    """Raise ValueError unless all given tensors (None skipped) share one device.

    Example:
        >>> check_same_device("quantize_8bit", torch.zeros(1), None, torch.zeros(2))
    """
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devs))}")


def check_dequant_4bit_args(packed, absmax, code, blocksize, numel, dtype,
                            nested_absmax, nested_code) -> None:
    """The checks of csrc/cpu/quantize_cpu.cpp ``check_dequant_args``, message for message.

    Example:
        >>> check_dequant_4bit_args(torch.zeros(3, 1, dtype=torch.uint8), torch.ones(1),
        ...                         torch.zeros(16), 64, 5, torch.float16, None, None)
    """
    check_blocksize(blocksize)
    w = "dequantize_4bit"
    if numel < 0:
        raise ValueError(f"{w}: numel must be >= 0, got {numel}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"{w}: packed must be uint8, got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{w}: packed holds {packed.numel()} bytes but numel {numel} "
                         f"needs {(numel + 1) // 2}")
    nblocks = -(-numel // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(f"{w}: absmax has {absmax.numel()} entries, expected {nblocks} "
                         f"(numel {numel}, blocksize {blocksize})")
    check_code(code, 16, w)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{w}: output dtype must be float32, float16 or bfloat16, got {dtype}")
    if (nested_absmax is None) != (nested_code is None):
        raise ValueError(f"{w}: nested_absmax and nested_code go together")
    if nested_absmax is not None:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"{w}: a double-quantized absmax must be uint8, got {absmax.dtype}")
        n2 = -(-nblocks // NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != n2:
            raise ValueError(f"{w}: nested_absmax must be float32 with ceil(nblocks / 256) = "
                             f"{n2} entries")
        check_code(nested_code, 256, f"{w} (nested_code)")
    elif absmax.dtype != torch.float32:
        raise TypeError(f"{w}: absmax must be float32, got {absmax.dtype} "
                        "(a uint8 absmax needs nested_absmax and nested_code)")
    check_same_device(w, packed, absmax, code, nested_absmax, nested_code)


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
