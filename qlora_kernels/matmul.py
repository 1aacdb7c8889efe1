"""The fused 4-bit matmul: ``matmul_4bit(x, packed, state, bias)`` = ``x @ W^T + bias``.

The ``qlora_kernels::matmul_4bit`` op (schema in csrc/ops.cpp) is implemented here and
picks a path by shape and device:

* GEMV (few rows of x, e.g. token-by-token generation): the fused kernel that streams the
  packed weight once (``gemv_4bit``: AVX2 on the CPU, CUDA on GPUs).
* GEMM (training, prefill): W is dequantized into the GEMM dtype and fed to torch's dense
  GEMM. On the CPU a tile of rows at a time (about 4 MB, reused: small transient memory, no
  re-faulting of a fresh full-size buffer), in bf16 where the CPU computes bf16 natively and
  float32 otherwise (a bf16 GEMM on an AVX2-only CPU runs at a fraction of float32 speed);
  on GPUs the whole W at once into x's dtype, for cuBLAS (the CUDA dequantize of a
  14336x4096 weight costs less than a third of a 2048-row bf16 GEMM on it, while the Triton
  GEMM that dequantizes in registers measured 10-27x dense there: benchmarks/README.md,
  GPU). The Triton GEMM serves the op when the Triton backend is selected.

The row threshold between the two is measured on this machine once (on the CPU, per dtype
of x: ``gemv_calibration.py``, cached per CPU model), a rule from the CPU's features until
then; override it with ``set_gemv_max_rows`` or the environment variable
``QLORA_KERNELS_GEMV_MAX_ROWS`` (``gemv_threshold`` says which is in force). Backward
computes ``grad_x = grad_y @ W`` from the packed weight again; only the packed weight and
its state are saved, never x or a dequantized W.

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
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _extension, cpu_dispatch, gemv_calibration, ops  # noqa: F401
from .formats import FLOAT_DTYPES
from .op_checks import check_4bit_weight
from .quant_state import QuantState

# The GEMV/GEMM switch: x with at most this many rows takes the GEMV path. In force, first
# to last: the environment variable QLORA_KERNELS_GEMV_MAX_ROWS (every device and dtype);
# set_gemv_max_rows (an entry of GEMV_MAX_ROWS, per device type or per "device:dtype" of x;
# None: not set); on the CPU, this machine's calibration (gemv_calibration.py, cached per CPU
# model); the features rule (features_gemv_max_rows).
GEMV_MAX_ROWS: Dict[str, Optional[int]] = {"cpu": None, "cuda": None}
_ENV = "QLORA_KERNELS_GEMV_MAX_ROWS"


def _dtype_key(device_type: str, dtype: torch.dtype) -> str:
    return f"{device_type}:{str(dtype).removeprefix('torch.')}"  # e.g. "cpu:bfloat16"


def features_gemv_max_rows(device_type: str, dtype: Optional[torch.dtype] = None) -> int:
    """The GEMV/GEMM threshold from the CPU's features alone, in force until this machine is
    calibrated. CPU, measured by benchmarks/bench_matmul.py and bench_layer.py
    (benchmarks/README.md): bf16 x (the block fixed-point GEMV) wins up to 64 rows against
    the float32 GEMM of an AVX2-only CPU, up to 16 against the bf16 GEMM of a CPU that
    computes bf16 natively; float32/float16 x (the exact float GEMV) up to 8. CUDA: 4, a
    placeholder until bench_matmul.py runs on a GPU.

    Example:
        >>> features_gemv_max_rows("cpu", torch.float32)
        8
    """
    if device_type != "cpu":
        return 4
    if dtype == torch.bfloat16:
        return 16 if cpu_dispatch.native_bf16() else 64
    return 8


def set_gemv_max_rows(rows: int, device_type: str = "cpu",
                      dtype: Optional[torch.dtype] = None) -> None:
    """Override the GEMV/GEMM switch: x with at most ``rows`` rows takes the GEMV path, for x
    of ``dtype`` on ``device_type``, or for every dtype there when ``dtype`` is None. It
    wins over the calibration and the features rule; the environment variable
    ``QLORA_KERNELS_GEMV_MAX_ROWS`` wins over it.

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


def gemv_threshold(device_type: str, dtype: Optional[torch.dtype] = None,
                   may_calibrate: bool = False) -> Tuple[int, str]:
    """The GEMV/GEMM threshold in force for x of ``dtype`` (None: float32) on
    ``device_type``, and where it comes from: ``"env QLORA_KERNELS_GEMV_MAX_ROWS"``,
    ``"set_gemv_max_rows"``, ``"calibration cache <file>"`` or ``"features rule"``.
    ``may_calibrate``: a CPU call that may run this machine's calibration first
    (``gemv_calibration.cached_gemv_max_rows``).

    Example:
        >>> rows, source = gemv_threshold("cuda", torch.float16); source
        'features rule'
    """
    env = os.environ.get(_ENV)
    if env:
        return int(env), f"env {_ENV}"
    rows = None if dtype is None else GEMV_MAX_ROWS.get(_dtype_key(device_type, dtype))
    if rows is None:
        rows = GEMV_MAX_ROWS.get(device_type)
    if rows is not None:
        return rows, "set_gemv_max_rows"
    if device_type == "cpu":
        rows = gemv_calibration.cached_gemv_max_rows(dtype or torch.float32, may_calibrate)
        if rows is not None:
            return rows, f"calibration cache {gemv_calibration.cache_path()}"
    return features_gemv_max_rows(device_type, dtype), "features rule"


def gemv_max_rows(device_type: str, dtype: Optional[torch.dtype] = None) -> int:
    """The GEMV/GEMM threshold in force for x of ``dtype`` on ``device_type``
    (``gemv_threshold`` says where it comes from).

    Example:
        >>> gemv_max_rows("cpu", torch.float32) >= 0
        True
    """
    return gemv_threshold(device_type, dtype)[0]


# Bytes of W dequantized per CPU GEMM tile, and at least this many rows (forward) or columns
# (backward) per tile: each tile's GEMM streams all of x (forward) or grad_y (backward) once
# more, so thin tiles of a wide W cost (4096x11008 at 512 rows, float32: 64-row tiles 1.22x
# dense, 256-row 1.0x). From 256 rows of x, 16 MB tiles (bf16 forward+backward at 512 rows:
# 4096x4096 and 11008x4096 1.05-1.07x dense, against 1.07-1.13x with 4 MB; one tile of a
# whole 32 MB W ran at 1.32x: dequantized past the cache, then read back); below, 4 MB
# (4096x4096 at 16 rows: the GEMMs of 512-row bf16 tiles take 3.5 ms, of 2048-row 4.0 ms).
# GPUs take W whole (one dequantize, one GEMM).
TILE_BYTES = 16 << 20
SMALL_TILE_BYTES = 4 << 20
LARGE_TILE_MIN_ROWS = 256
MIN_TILE_ROWS = 256


def _tile_bytes(device: torch.device, rows: int) -> int:
    """Bytes per dequantized tile of W for a GEMM with ``rows`` rows of x (or grad_y)."""
    if device.type != "cpu":
        return 1 << 62
    return TILE_BYTES if rows >= LARGE_TILE_MIN_ROWS else SMALL_TILE_BYTES


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMM path dequantizes W into and runs the dense GEMM in, for x: x's own
    on GPUs; on the CPU ``cpu_gemm_dtype(x.dtype)``.

    Example:
        >>> gemm_dtype(torch.ones(1))
        torch.float32
    """
    return cpu_gemm_dtype(x.dtype) if x.device.type == "cpu" else x.dtype


def cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU GEMM path runs its dense GEMM in for x of ``dtype``: x's own where
    the CPU has a fast GEMM for it (float32 always, bf16 where the CPU computes bf16
    natively), float32 otherwise (fp16 GEMMs, and bf16 ones on AVX2-only CPUs, run at a
    fraction of float32 speed).

    Example:
        >>> cpu_gemm_dtype(torch.float16)
        torch.float32
    """
    if dtype == torch.bfloat16 and cpu_dispatch.native_bf16():
        return dtype
    return torch.float32


def _tile_len(other: int, esize: int, step: int, tile_bytes: Optional[int] = None) -> int:
    """Rows (or columns) per tile of W for ``other`` columns (rows) of ``esize``-byte
    elements, a multiple of ``step``."""
    n = max((tile_bytes or TILE_BYTES) // esize // max(other, 1), MIN_TILE_ROWS)
    return max(step, n // step * step)


def _row_tiles(n: int, k: int, blocksize: int, nested: bool, esize: int = 4,
               tile_bytes: Optional[int] = None):
    """Row ranges of W whose flat start is aligned to a block (and to a 256-block group of
    the nested scales), so each tile's bytes, absmax and nested scales are plain slices."""
    align = blocksize * (256 if nested else 1)
    rows = _tile_len(k, esize, align // math.gcd(k, align), tile_bytes)  # rows per aligned unit
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def _dequantize_tiles(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, offset,
                      dtype=torch.float32, rows_of_x: int = 0):
    """Yield (r0, r1, W[r0:r1] in ``dtype``) tiles for a GEMM with ``rows_of_x`` rows,
    reusing one buffer."""
    flat = packed.reshape(-1)
    tiles = _row_tiles(n, k, blocksize, nested_absmax is not None, dtype.itemsize,
                       _tile_bytes(packed.device, rows_of_x))
    buf = torch.empty((tiles[0][1] - tiles[0][0]) * k, dtype=dtype, device=packed.device)
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


def _dequantize_col_tiles(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code,
                          offset, dtype, rows_of_grad: int):
    """Yield (c0, c1, W[:, c0:c1] in ``dtype``) tiles (k a multiple of the blocksize), so
    each column range of grad_x is one GEMM: rounded once, never accumulated across tiles."""
    cols = _tile_len(n, dtype.itemsize, blocksize, _tile_bytes(packed.device, rows_of_grad))
    buf = torch.empty(n * min(cols, k), dtype=dtype, device=packed.device)
    for c0 in range(0, k, cols):
        c1 = min(k, c0 + cols)
        w = buf[: n * (c1 - c0)].view(n, c1 - c0)
        torch.ops.qlora_kernels.dequantize_4bit_cols_out(packed, absmax, code, blocksize,
                                                         nested_absmax, nested_code, offset, k, c0, w)
        yield c0, c1, w


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
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: x must be float32, float16 or bfloat16, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} (cast x first)")
    if x.dim() == 0:
        raise ValueError(f"{what}: x must have at least one dimension (..., in_features), "
                         "got a 0-d tensor")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        raise TypeError(f"{what}: bias must be a floating-point tensor, got "
                        f"{getattr(bias, 'dtype', type(bias).__name__)}")


def _gemv_path(x2, packed, absmax, code, blocksize, out_features, nested_absmax, nested_code,
               offset, bias):
    # x in its own dtype: the kernel accumulates in float32 (bias included) and rounds
    # once; with bf16 x the CPU kernel works in block fixed point (csrc/cpu/gemv_cpu.cpp)
    return torch.ops.qlora_kernels.gemv_4bit(x2, packed, absmax, code, blocksize, out_features,
                                             nested_absmax, nested_code, offset, bias)


def _gemm_path(x2, packed, absmax, code, blocksize, out_features, nested_absmax, nested_code,
               offset, bias):
    check_4bit_weight("matmul_4bit", packed, absmax, code, blocksize, out_features * x2.shape[1],
                      nested_absmax, nested_code)
    # W dequantized a tile at a time straight into the GEMM dtype; each tile's GEMM
    # writes its own columns of y (rounded once, bias included: addmm).
    gd = gemm_dtype(x2)
    xg = x2.to(gd)
    y = torch.empty(x2.shape[0], out_features, dtype=gd, device=x2.device)
    bg = None if bias is None else bias.to(gd)
    for r0, r1, w in _dequantize_tiles(packed, absmax, code, blocksize, out_features,
                                       x2.shape[1], nested_absmax, nested_code, offset, gd,
                                       x2.shape[0]):
        if bg is None:
            torch.mm(xg, w.T, out=y[:, r0:r1])
        else:
            torch.addmm(bg[r0:r1], xg, w.T, out=y[:, r0:r1])
    return y.to(x2.dtype)


def _matmul_4bit_impl(x, packed, absmax, code, blocksize, out_features, nested_absmax=None,
                      nested_code=None, offset=0.0, bias=None):
    check_matmul_input(x, bias)
    if x.is_cuda:  # first CUDA use: falls back from kernels with no image for this GPU
        _extension.cuda_kernels_runnable(x.device)
    k = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # (-1, 0) is ambiguous for k = 0
    m = x2.shape[0]
    args = (packed, absmax, code, blocksize, out_features, nested_absmax, nested_code, offset,
            bias)
    if m == 0 or k == 0 or out_features == 0:  # as nn.Linear: an empty sum is 0, plus bias
        y = torch.zeros(m, out_features, dtype=torch.float32, device=x.device)
        if bias is not None:
            y += bias.float()
        y = y.to(x.dtype)
    elif m <= gemv_threshold(x.device.type, x.dtype, may_calibrate=1 < m <= 128)[0]:
        y = _gemv_path(x2, *args)
    else:
        y = _gemm_path(x2, *args)
    return y.view(*x.shape[:-1], out_features)


def _matmul_4bit_backward_impl(grad_y, packed, absmax, code, blocksize, in_features,
                               nested_absmax=None, nested_code=None, offset=0.0):
    n = grad_y.shape[-1]
    g2 = grad_y.reshape(math.prod(grad_y.shape[:-1]), n)
    check_4bit_weight("matmul_4bit_backward", packed, absmax, code, blocksize, n * in_features,
                      nested_absmax, nested_code)
    if g2.shape[0] == 0 or n == 0 or in_features == 0:
        gx = torch.zeros(g2.shape[0], in_features, dtype=torch.float32, device=grad_y.device)
    else:
        gd = gemm_dtype(g2)
        gg = g2.to(gd)
        if in_features % blocksize == 0:
            gx = torch.empty(g2.shape[0], in_features, dtype=gd, device=grad_y.device)
            for c0, c1, w in _dequantize_col_tiles(packed, absmax, code, blocksize, n,
                                                   in_features, nested_absmax, nested_code,
                                                   offset, gd, g2.shape[0]):
                torch.mm(gg, w, out=gx[:, c0:c1])
        else:  # row tiles whose partial products add up in float32
            gf = gg.float()
            gx = torch.zeros(g2.shape[0], in_features, dtype=torch.float32, device=grad_y.device)
            for r0, r1, w in _dequantize_tiles(packed, absmax, code, blocksize, n, in_features,
                                               nested_absmax, nested_code, offset,
                                               rows_of_x=g2.shape[0]):
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
    return matmul_4bit_call(x, packed, n, state.op_args(), bias)


def matmul_4bit_call(x: torch.Tensor, packed: torch.Tensor, out_features: int, op_args: tuple,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The one way into the ``matmul_4bit`` op, for ``matmul_4bit`` and ``Linear4bit``:
    arguments already checked, ``op_args`` from ``QuantState.op_args()``.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> packed, state = qk.quantize_4bit(torch.randn(8, 16))
        >>> matmul_4bit_call(torch.randn(2, 16), packed, 8, state.op_args()).shape
        torch.Size([2, 8])
    """
    absmax, code, blocksize, nested_absmax, nested_code, offset = op_args
    args = (x, packed, absmax, code, blocksize, out_features,
            nested_absmax, nested_code, offset, bias)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad))):
        # Nothing to differentiate: enter the dispatcher below the autograd key. The custom
        # op's Python autograd layer costs ~50 us per call, 10% of a 4096x4096 GEMV on the
        # CPU (token-by-token generation); the device kernels are still chosen by the
        # dispatcher, so a backend override applies here too.
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.qlora_kernels.matmul_4bit.default(*args)
    return torch.ops.qlora_kernels.matmul_4bit.default(*args)
