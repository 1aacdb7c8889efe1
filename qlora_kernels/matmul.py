"""The fused 4-bit matmul: ``matmul_4bit(x, packed, state, bias)`` = ``x @ W^T + bias``.

The ``qlora_kernels::matmul_4bit`` op (schema in csrc/ops.cpp) is implemented here and
picks a path by shape and device:

* GEMV (few rows of x, e.g. token-by-token generation): the fused kernel that streams the
  packed weight once (``gemv_4bit``: AVX2 on the CPU, CUDA on GPUs).
* GEMM (training, prefill): on GPUs the Triton kernel that dequantizes tiles of W in
  registers; on the CPU, W is dequantized to float32 a tile of rows at a time (about 4 MB,
  reused) and each tile feeds the dense float32 GEMM (float32 is the fastest correct path
  on AVX2 CPUs without native bf16); the result is rounded to the input dtype. Tiling
  keeps the transient memory small and avoids re-faulting a fresh full-size buffer.

The row thresholds come from ``benchmarks/bench_matmul.py`` (see benchmarks/README.md);
override them with ``set_gemv_max_rows`` or the environment variable
``QLORA_KERNELS_GEMV_MAX_ROWS``. Backward computes ``grad_x = grad_y @ W`` from the packed
weight again; only the packed weight and its state are saved, never x or a dequantized W.

Example:
    >>> import torch, qlora_kernels as qk
    >>> w = torch.randn(64, 128)
    >>> packed, state = qk.quantize_4bit(w)
    >>> qk.matmul_4bit(torch.randn(3, 128), packed, state).shape
    torch.Size([3, 64])
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import ops  # noqa: F401
from .quant_state import QuantState

# Largest number of rows of x that takes the GEMV path, per device type, and per
# "device:dtype" of x where that differs. CPU, measured by benchmarks/bench_matmul.py
# (2026-11-22, 2-core AVX2) on the 4096x4096, 11008x4096 and 4096x11008 shapes: bf16 x
# (the block fixed-point GEMV) wins up to 64 rows, GEMM from 96; float32/float16 x (the
# exact float GEMV) wins up to 8, GEMM from 16. CUDA: not yet measured (no GPU was
# available); 4 is a placeholder until bench_matmul.py runs on one.
GEMV_MAX_ROWS = {"cpu": 8, "cpu:bfloat16": 64, "cuda": 4}
_ENV = "QLORA_KERNELS_GEMV_MAX_ROWS"


def _dtype_key(device_type: str, dtype: torch.dtype) -> str:
    return f"{device_type}:{str(dtype).removeprefix('torch.')}"  # e.g. "cpu:bfloat16"


def set_gemv_max_rows(rows: int, device_type: str = "cpu",
                      dtype: Optional[torch.dtype] = None) -> None:
    """Override the GEMV/GEMM switch: x with at most ``rows`` rows takes the GEMV path, for x
    of ``dtype`` on ``device_type``, or for every dtype there when ``dtype`` is None.

    Example:
        >>> saved = dict(GEMV_MAX_ROWS)
        >>> set_gemv_max_rows(16, "cpu", torch.float32); gemv_max_rows("cpu", torch.float32)
        16
        >>> set_gemv_max_rows(2, "cpu"); gemv_max_rows("cpu", torch.bfloat16)
        2
        >>> GEMV_MAX_ROWS.clear(); GEMV_MAX_ROWS.update(saved)
    """
    if dtype is None:
        for key in [key for key in GEMV_MAX_ROWS if key.startswith(device_type + ":")]:
            del GEMV_MAX_ROWS[key]
        GEMV_MAX_ROWS[device_type] = int(rows)
    else:
        GEMV_MAX_ROWS[_dtype_key(device_type, dtype)] = int(rows)


def gemv_max_rows(device_type: str, dtype: Optional[torch.dtype] = None) -> int:
    """The GEMV/GEMM threshold for x of ``dtype`` on ``device_type`` (env
    ``QLORA_KERNELS_GEMV_MAX_ROWS`` overrides every one).

    Example:
        >>> gemv_max_rows("cpu", torch.float32) >= 1
        True
    """
    env = os.environ.get(_ENV)
    if env:
        return int(env)
    if dtype is not None and _dtype_key(device_type, dtype) in GEMV_MAX_ROWS:
        return GEMV_MAX_ROWS[_dtype_key(device_type, dtype)]
    return GEMV_MAX_ROWS.get(device_type, 8)


# Elements of W dequantized per CPU GEMM tile (float32: 4 MB), and at least this many rows:
# each tile's GEMM streams all of x (forward) or grad_x (backward) once more, so thin tiles
# of a wide W cost (4096x11008 at 512 rows: 64-row tiles 1.22x dense float32, 256-row 1.0x).
TILE_ELEMENTS = 1 << 20
MIN_TILE_ROWS = 256


def _row_tiles(n: int, k: int, blocksize: int, nested: bool):
    """Row ranges of W whose flat start is aligned to a block (and to a 256-block group of
    the nested scales), so each tile's bytes, absmax and nested scales are plain slices."""
    align = blocksize * (256 if nested else 1)
    step = align // math.gcd(k, align)  # rows per aligned unit (align is even)
    rows = max(step, max(TILE_ELEMENTS // max(k, 1), MIN_TILE_ROWS) // step * step)
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def _dequantize_tiles(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset):
    """Yield (r0, r1, W[r0:r1] as float32) tiles, reusing one buffer."""
    flat = packed.reshape(-1)
    tiles = _row_tiles(n, k, blocksize, nested_absmax is not None)
    buf = torch.empty((tiles[0][1] - tiles[0][0]) * k, dtype=torch.float32, device=packed.device)
    for r0, r1 in tiles:
        e0, e1 = r0 * k, r1 * k
        b0, b1 = e0 // blocksize, -(-e1 // blocksize)
        na = None
        if nested_absmax is not None:
            na = nested_absmax[b0 // 256: -(-b1 // 256)]
        w = buf[: e1 - e0]
        torch.ops.qlora_kernels.dequantize_4bit_out(flat[e0 // 2: (e1 + 1) // 2], absmax[b0:b1],
                                                    code, blocksize, na, nested_code, offset, w)
        yield r0, r1, w.view(r1 - r0, k)


def _triton_backend(device: torch.device):
    if device.type != "cuda":
        return None
    try:
        from .backends import triton as tb
    except Exception:
        return None
    return tb if hasattr(tb, "matmul_4bit") else None


COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_matmul_input(x, bias=None, what: str = "matmul_4bit") -> None:
    """The dtype rule of every matmul path (GEMV, GEMM, Triton; function, op and module):
    x is float32, float16 or bfloat16 with at least one dimension, and bias (if any) is a
    floating-point tensor; TypeError naming the dtype otherwise, whatever the batch size.
    float64 is refused rather than cast: the kernels compute in float32 and a float64 result
    would claim a precision a 4-bit weight never has (cast x, or set compute_dtype).

    Example:
        >>> import torch
        >>> check_matmul_input(torch.ones(2, 3, dtype=torch.float64))
        Traceback (most recent call last):
        TypeError: matmul_4bit: x must be float32, float16 or bfloat16, got torch.float64 (cast x first)
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{what}: x must be float32, float16 or bfloat16, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} (cast x first)")
    if x.dim() == 0:
        raise ValueError(f"{what}: x must have at least one dimension (..., in_features), "
                         "got a 0-d tensor")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        raise TypeError(f"{what}: bias must be a floating-point tensor, got "
                        f"{getattr(bias, 'dtype', type(bias).__name__)}")


def _matmul_4bit_impl(x, packed, absmax, code, blocksize, out_features, nested_absmax=None,
                      nested_code=None, offset=0.0, bias=None):
    check_matmul_input(x, bias)
    k = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # (-1, 0) is ambiguous for k = 0
    m = x2.shape[0]
    if m == 0 or k == 0 or out_features == 0:  # as nn.Linear: an empty sum is 0, plus bias
        y = torch.zeros(m, out_features, dtype=torch.float32, device=x.device)
        if bias is not None:
            y += bias.float()
    elif m <= gemv_max_rows(x.device.type, x.dtype):
        # x in its own dtype: the kernel accumulates in float32 (bias included) and rounds
        # once; with bf16 x the CPU kernel works in block fixed point (csrc/cpu/gemv_cpu.cpp)
        y = torch.ops.qlora_kernels.gemv_4bit(x2, packed, absmax, code, blocksize, out_features,
                                              nested_absmax, nested_code, offset, bias)
        return y.view(*x.shape[:-1], out_features)
    else:
        tb = _triton_backend(x.device)
        if tb is not None:
            y = tb.matmul_4bit(x2, packed, absmax, code, blocksize, out_features, k,
                               nested_absmax, nested_code, offset).float()
            if bias is not None:
                y = y + bias.float()
        else:
            xf = x2.float()
            y = torch.empty(m, out_features, dtype=torch.float32, device=x.device)
            for r0, r1, w in _dequantize_tiles(packed, absmax, code, blocksize, out_features, k,
                                               nested_absmax, nested_code, offset):
                y[:, r0:r1] = xf @ w.T
            if bias is not None:
                y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def _matmul_4bit_backward_impl(grad_y, packed, absmax, code, blocksize, in_features,
                               nested_absmax=None, nested_code=None, offset=0.0):
    n = grad_y.shape[-1]
    g2 = grad_y.reshape(math.prod(grad_y.shape[:-1]), n)
    tb = _triton_backend(grad_y.device)
    if g2.shape[0] == 0 or n == 0 or in_features == 0:
        gx = torch.zeros(g2.shape[0], in_features, dtype=torch.float32, device=grad_y.device)
    elif tb is not None:
        gx = tb.matmul_4bit(g2, packed, absmax, code, blocksize, n, in_features, nested_absmax,
                            nested_code, offset, transpose_w=True)
    else:
        gf = g2.float()
        gx = torch.zeros(g2.shape[0], in_features, dtype=torch.float32, device=grad_y.device)
        for r0, r1, w in _dequantize_tiles(packed, absmax, code, blocksize, n, in_features,
                                           nested_absmax, nested_code, offset):
            gx.addmm_(gf[:, r0:r1], w)
    return gx.to(grad_y.dtype).view(*grad_y.shape[:-1], in_features)


_lib = torch.library.Library("qlora_kernels", "IMPL")
_lib.impl("matmul_4bit", _matmul_4bit_impl, "CompositeExplicitAutograd")
_lib.impl("matmul_4bit_backward", _matmul_4bit_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("qlora_kernels::matmul_4bit")
def _matmul_4bit_fake(x, packed, absmax, code, blocksize, out_features, nested_absmax=None,
                      nested_code=None, offset=0.0, bias=None):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("qlora_kernels::matmul_4bit_backward")
def _matmul_4bit_backward_fake(grad_y, packed, absmax, code, blocksize, in_features,
                               nested_absmax=None, nested_code=None, offset=0.0):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, blocksize, out_features, nested_absmax, nested_code, offset, bias = inputs
    # Only the packed weight and its state are kept for backward: not x, not a dense W.
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code)
    ctx.blocksize, ctx.offset, ctx.in_features = blocksize, offset, x.shape[-1]
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.qlora_kernels.matmul_4bit_backward(
            grad, packed, absmax, code, ctx.blocksize, ctx.in_features, nested_absmax,
            nested_code, ctx.offset)
    if ctx.has_bias and ctx.needs_input_grad[9]:
        grad_bias = grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("qlora_kernels::matmul_4bit", _backward,
                                setup_context=_setup_context)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with W the 4-bit weight ``(packed, state)`` of shape (N, K);
    differentiable w.r.t. ``x`` and ``bias`` (the weight is frozen). Returns x's dtype.

    Raises TypeError for x that is not float32/float16/bfloat16 or a non-float bias
    (``check_matmul_input``: the same on every path and batch size), and ValueError when x
    is 0-d or its last dimension or the packed bytes do not match the state.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> packed, state = qk.quantize_4bit(torch.randn(32, 64))
        >>> x = torch.randn(2, 5, 64, requires_grad=True)
        >>> qk.matmul_4bit(x, packed, state).sum().backward(); x.grad.shape
        torch.Size([2, 5, 64])
    """
    check_matmul_input(x, bias)
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit: the weight must be 2-D (out, in), its state has shape "
                         f"{list(state.shape)}")
    n, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"matmul_4bit: x has last dimension {x.shape[-1]} but the weight is "
                         f"{n}x{k} (in_features {k})")
    state.validate(packed)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"matmul_4bit: bias must have shape ({n},), got {tuple(bias.shape)}")
    s2 = state.state2
    args = (x, packed, state.absmax, state.code, state.blocksize, n,
            None if s2 is None else s2.absmax, None if s2 is None else s2.code,
            float(state.offset or 0.0), bias)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad))):
        # Nothing to differentiate: call the implementation directly. Going through the
        # custom op's Python autograd and dispatch layers costs ~50 us per call, 10% of a
        # 4096x4096 GEMV on the CPU (token-by-token generation).
        return _matmul_4bit_impl(*args)
    return torch.ops.qlora_kernels.matmul_4bit(*args)
