"""Triton 8-bit blockwise quantization with a sorted 256-entry code (dynamic map, FP8, or
any table), bit-exact with ``qlora_kernels.backends.reference.quantize_8bit/dequantize_8bit``.
Used for double quantization of absmax and for 8-bit optimizer state.

Kernels: quantize: one program handles ROWS blocks as a [ROWS, CHUNK] tile, sweeping each
block in CHUNK-wide steps twice (absmax, then encode), so any positive blocksize works.
Encoding is qk::encode_sorted256: a binary search for the number of midpoints
``(code[k] + code[k+1]) * 0.5`` strictly below s. Grid: (ceil(nblocks / ROWS),).
dequantize: one program per ELEMS consecutive elements. Grid: (ceil(n / ELEMS),).

Example:
    >>> import torch
    >>> from qlora_kernels.formats import dynamic_map
    >>> from qlora_kernels.triton.blockwise_8bit import quantize_8bit, dequantize_8bit
    >>> q, absmax = quantize_8bit(torch.randn(300), dynamic_map(), 256)    # doctest: +SKIP
    >>> dequantize_8bit(q, absmax, dynamic_map(), 256, torch.float32).shape  # doctest: +SKIP
    torch.Size([300])
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..op_checks import check_dequantize_8bit_args, check_quantize_8bit_args
from ._common import next_pow2, on_device, tile_elements
from .dequantize_4bit import cast_rn
from .quantize_4bit import inverse_absmax

_TILE_ELEMENTS = 2048
_ELEMS = 2048


# --- kernels ------------------------------------------------------------------------------
@triton.jit
def _encode_sorted256(s, code_ptr):
    """Count of midpoints of the sorted table strictly below s (NaN -> 0), by bisection."""
    lo = tl.zeros(s.shape, dtype=tl.int32)
    for k in tl.static_range(8):
        idx = lo + (128 >> k)
        ok = idx <= 255
        c0 = tl.load(code_ptr + idx - 1, mask=ok, other=0.0)
        c1 = tl.load(code_ptr + idx, mask=ok, other=0.0)
        lo = tl.where(ok & (s > (c0 + c1) * 0.5), idx, lo)
    return lo


@triton.jit
def _quantize_8bit_kernel(x_ptr, code_ptr, q_ptr, absmax_ptr, n, nblocks, blocksize,
                          ROWS: tl.constexpr, CHUNK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, CHUNK)
    base = rows[:, None] * blocksize
    m = tl.zeros((ROWS,), dtype=tl.float32)
    has_nan = tl.zeros((ROWS,), dtype=tl.int32)
    for c in range(0, blocksize, CHUNK):
        idx = base + (c + cols)[None, :]
        mask = ((c + cols)[None, :] < blocksize) & (idx < n)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.max(tl.abs(x), axis=1))
        # a GPU max may drop NaN: flag it separately
        has_nan = tl.maximum(has_nan, tl.max((x != x).to(tl.int32), axis=1))
    m = tl.where(has_nan > 0, float("nan"), m)
    tl.store(absmax_ptr + rows, m, mask=rows < nblocks)
    inv = inverse_absmax(m)
    for c in range(0, blocksize, CHUNK):
        idx = base + (c + cols)[None, :]
        mask = ((c + cols)[None, :] < blocksize) & (idx < n)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        q = _encode_sorted256(x * inv[:, None], code_ptr)
        tl.store(q_ptr + idx, q.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_8bit_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize,
                            ELEMS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * ELEMS + tl.arange(0, ELEMS)
    mask = i < n
    q = tl.load(q_ptr + i, mask=mask, other=0).to(tl.int32)
    a = tl.load(absmax_ptr + i // blocksize, mask=mask, other=0.0)
    v = tl.load(code_ptr + q) * a
    tl.store(out_ptr + i, cast_rn(v, out_ptr.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------------
def quantize_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise 8-bit quantization of ``A`` (flattened) with the sorted 256-entry ``code``.

    Returns ``(q uint8 [n], absmax float32 [ceil(n / blocksize)])``; NaN in a block gives
    absmax NaN, Inf gives Inf.

    Example:
        >>> q, absmax = quantize_8bit(torch.randn(10), dynamic_map(), 4)  # doctest: +SKIP
        >>> q.dtype, absmax.shape                                         # doctest: +SKIP
        (torch.uint8, torch.Size([3]))
    """
    check_quantize_8bit_args(A, code, blocksize)
    x = A.reshape(-1).contiguous()
    n = x.numel()
    nblocks = -(-n // blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return q, absmax
    tile = tile_elements(_TILE_ELEMENTS)
    chunk = min(next_pow2(blocksize), tile)
    rows = max(1, tile // chunk)
    with on_device(x):
        _quantize_8bit_kernel[(triton.cdiv(nblocks, rows),)](
            x, code.contiguous(), q, absmax, n, nblocks, int(blocksize), ROWS=rows, CHUNK=chunk)
    return q, absmax


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """``code[q[i]] * absmax[i // blocksize]`` in float32, rounded once to ``dtype``.

    Example:
        >>> dequantize_8bit(q, absmax, dynamic_map(), 4, torch.float16).shape  # doctest: +SKIP
        torch.Size([10])
    """
    check_dequantize_8bit_args(q, absmax, code, blocksize, dtype)
    n = q.numel()
    out = torch.empty(n, dtype=dtype, device=q.device)
    if n == 0:
        return out
    with on_device(q):
        elems = tile_elements(_ELEMS)
        _dequantize_8bit_kernel[(triton.cdiv(n, elems),)](
            q.reshape(-1).contiguous(), absmax.contiguous(), code.contiguous(), out, n,
            int(blocksize), ELEMS=elems)
    return out
