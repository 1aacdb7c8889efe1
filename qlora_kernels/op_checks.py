"""Argument checks of the 4-bit and 8-bit ops, for the Python implementations (the
reference and the Triton launchers).

The compiled kernels make the same checks in C++ (csrc/include/qk_4bit_checks.h and the
8-bit ops in csrc/cpu/quantize_cpu.cpp) with the same messages, so a bad argument fails the
same way whichever backend the dispatcher picks, before any work starts.

Example:
    >>> import torch
    >>> check_4bit_weight("dequantize_4bit", torch.zeros(3, 1, dtype=torch.uint8),
    ...                   torch.ones(2), torch.zeros(16), 64, 5, None, None)
    Traceback (most recent call last):
    ValueError: dequantize_4bit: absmax has 2 entries, expected 1 (numel 5, blocksize 64)
"""
from __future__ import annotations

import torch

from .formats import FLOAT_DTYPES, NESTED_BLOCKSIZE, check_blocksize, check_out_dtype


def check_float_input(A, what: str) -> None:
    """Raise TypeError unless ``A`` is a float32, float16 or bfloat16 tensor.

    Example:
        >>> check_float_input(torch.ones(1, dtype=torch.int32), "quantize_4bit")
        Traceback (most recent call last):
        TypeError: quantize_4bit: input must be float32, float16 or bfloat16, got torch.int32
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(A).__name__}")
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


def check_4bit_weight(op: str, packed, absmax, code, blocksize: int, numel: int,
                      nested_absmax, nested_code) -> None:
    """A packed 4-bit weight of ``numel`` elements and its state: ``qk_checks::
    check_4bit_weight`` of the C++ header, message for message, plus one device.

    Example:
        >>> check_4bit_weight("gemv_4bit", torch.zeros(3, 1, dtype=torch.uint8), torch.ones(1),
        ...                   torch.zeros(16), 64, 5, None, None)
    """
    check_blocksize(blocksize)
    if numel < 0:
        raise ValueError(f"{op}: numel must be >= 0, got {numel}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"{op}: packed must be uint8, got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{op}: packed holds {packed.numel()} bytes but numel {numel} "
                         f"needs {(numel + 1) // 2}")
    nblocks = -(-numel // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(f"{op}: absmax has {absmax.numel()} entries, expected {nblocks} "
                         f"(numel {numel}, blocksize {blocksize})")
    check_code(code, 16, op)
    if (nested_absmax is None) != (nested_code is None):
        raise ValueError(f"{op}: nested_absmax and nested_code go together")
    if nested_absmax is not None:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"{op}: a double-quantized absmax must be uint8, got {absmax.dtype}")
        n2 = -(-nblocks // NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != n2:
            raise ValueError(f"{op}: nested_absmax must be float32 with ceil(nblocks / 256) = "
                             f"{n2} entries, got {nested_absmax.numel()} {nested_absmax.dtype}")
        check_code(nested_code, 256, f"{op} (nested_code)")
    elif absmax.dtype != torch.float32:
        raise TypeError(f"{op}: absmax must be float32, got {absmax.dtype} "
                        "(a uint8 absmax needs nested_absmax and nested_code)")
    check_same_device(op, packed, absmax, code, nested_absmax, nested_code)


def check_quantize_8bit_args(A, code, blocksize: int) -> None:
    """The arguments of the ``quantize_8bit`` op.

    Example:
        >>> check_quantize_8bit_args(torch.randn(4), torch.zeros(256), 0)
        Traceback (most recent call last):
        ValueError: quantize_8bit: blocksize must be positive, got 0
    """
    check_float_input(A, "quantize_8bit")
    if blocksize <= 0:
        raise ValueError(f"quantize_8bit: blocksize must be positive, got {blocksize}")
    check_code(code, 256, "quantize_8bit")
    check_same_device("quantize_8bit", A, code)


def check_dequantize_8bit_args(q, absmax, code, blocksize: int, dtype) -> None:
    """The arguments of the ``dequantize_8bit`` op.

    Example:
        >>> check_dequantize_8bit_args(torch.zeros(5, dtype=torch.uint8), torch.ones(3),
        ...                            torch.zeros(256), 2, torch.float16)
    """
    if q.dtype != torch.uint8:
        raise TypeError(f"dequantize_8bit: q must be uint8, got {q.dtype}")
    if blocksize <= 0:
        raise ValueError(f"dequantize_8bit: blocksize must be positive, got {blocksize}")
    if absmax.dtype != torch.float32 or absmax.numel() != -(-q.numel() // blocksize):
        raise ValueError("dequantize_8bit: absmax must be float32 with ceil(numel / blocksize) "
                         "entries")
    check_code(code, 256, "dequantize_8bit")
    check_out_dtype(dtype, "dequantize_8bit")
    check_same_device("dequantize_8bit", q, absmax, code)
