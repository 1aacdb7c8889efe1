"""Triton 4-bit blockwise quantization (NF4 / FP4 / INT4), bit-exact with the reference
``qlora_kernels.backends.reference.quantize_4bit`` and the C++ kernels (csrc/include/qk_format.h).

Kernel: one program quantizes ROWS consecutive blocks of BLOCKSIZE elements, held as two
[ROWS, BLOCKSIZE/2] tiles (even and odd elements), so each pair of codes packs into one
byte without reshuffling registers. Grid: (ceil(nblocks / ROWS),).

Example:
    >>> import torch
    >>> from qlora_kernels.triton.quantize_4bit import quantize_4bit
    >>> packed, absmax = quantize_4bit(torch.randn(100), 64, "nf4")   # doctest: +SKIP
    >>> packed.shape, absmax.shape                                     # doctest: +SKIP
    (torch.Size([50, 1]), torch.Size([2]))
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..formats import check_blocksize, check_quant_type, encode_thresholds
from ..op_checks import check_float_input
from ._common import on_device, tile_elements

_QT = {"nf4": 0, "fp4": 1, "int4": 2}
# Elements one program holds on a GPU: enough to amortize the launch without spilling.
_TILE_ELEMENTS = 2048


# --- kernels ------------------------------------------------------------------------------
@triton.jit
def _count_below(v, thr_ptr, NTHR: tl.constexpr):
    """Number of thresholds strictly below v (NaN -> 0): nearest code, ties to the lower."""
    r = tl.zeros(v.shape, dtype=tl.int32)
    for k in tl.static_range(NTHR):
        r += (v > tl.load(thr_ptr + k)).to(tl.int32)
    return r


@triton.jit
def _encode_4bit(s, thr_ptr, QUANT_TYPE: tl.constexpr):
    if QUANT_TYPE == 1:  # fp4: rank among sorted magnitudes -> bit pattern, sign in bit 3
        r = _count_below(tl.abs(s), thr_ptr, 7)
        q = (r ^ ((r & 2) << 1)) | tl.where(s < 0.0, 8, 0)
    else:  # nf4 / int4: the table is sorted, the rank is the index
        q = _count_below(s, thr_ptr, 15)
    return q


@triton.jit
def inverse_absmax(m):
    """IEEE-rounded 1 / absmax, 0 where absmax is 0 (or NaN): qk::inverse_absmax."""
    pos = m > 0.0
    safe = tl.where(pos, m, 1.0)  # no 1/0 is ever computed (the interpreter would warn)
    return tl.where(pos, tl.math.div_rn(tl.full(m.shape, 1.0, tl.float32), safe), 0.0)


@triton.jit
def _load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """Elements as float32. bf16 widens by its bits (exact, subnormals included: the
    interpreter's own bf16 conversion flushes them to zero, and the sign of a tiny value
    picks FP4's -0 pattern)."""
    if IS_BF16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _inverse_absmax_4bit(m):
    """qk::inverse_absmax_4bit: 1 / absmax unguarded, as bitsandbytes. An all-zero block gets
    NaN instead of inf: every value is 0 there, and 0 * inf is NaN too, without the
    interpreter's division-by-zero warning."""
    zero = m == 0.0
    return tl.where(zero, float("nan"),
                    tl.math.div_rn(tl.full(m.shape, 1.0, tl.float32), tl.where(zero, 1.0, m)))


@triton.jit
def _quantize_4bit_kernel(x_ptr, packed_ptr, absmax_ptr, thr_ptr, n, nblocks,
                          BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
                          QUANT_TYPE: tl.constexpr, IS_BF16: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    even = rows[:, None] * BLOCKSIZE + 2 * tl.arange(0, HALF)[None, :]  # element 2j
    odd = even + 1                                                      # element 2j+1
    x0 = _load_f32(x_ptr, even, even < n, IS_BF16)
    x1 = _load_f32(x_ptr, odd, odd < n, IS_BF16)

    # A GPU max may drop NaN, so a block's NaN is flagged separately and forced through.
    m = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))
    has_nan = tl.max(((x0 != x0) | (x1 != x1)).to(tl.int32), axis=1) > 0
    m = tl.where(has_nan, float("nan"), m)
    inv = _inverse_absmax_4bit(m)
    tl.store(absmax_ptr + rows, m, mask=rows < nblocks)

    q0 = _encode_4bit(x0 * inv[:, None], thr_ptr, QUANT_TYPE)
    # odd numel: the final low nibble encodes the 0.0 loaded past the end, as bitsandbytes
    q1 = _encode_4bit(x1 * inv[:, None], thr_ptr, QUANT_TYPE)
    byte = ((q0 << 4) | q1).to(tl.uint8)
    tl.store(packed_ptr + (even >> 1), byte, mask=even < n)


# --- launcher -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _thresholds(quant_type: str, device: torch.device) -> torch.Tensor:
    return encode_thresholds(quant_type).to(device)


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """Quantize ``A`` (any shape, flattened) to packed 4-bit codes and per-block absmax.

    Returns ``(packed uint8 [(n+1)//2, 1], absmax float32 [ceil(n / blocksize)])``; a block
    holding NaN gets absmax NaN, one holding Inf gets Inf (the caller decides to raise).

    Example:
        >>> packed, absmax = quantize_4bit(torch.randn(65), 32, "fp4")  # doctest: +SKIP
        >>> packed.shape, absmax.shape                                   # doctest: +SKIP
        (torch.Size([33, 1]), torch.Size([3]))
    """
    check_float_input(A, "quantize_4bit")
    blocksize = check_blocksize(blocksize)
    check_quant_type(quant_type)
    x = A.reshape(-1).contiguous()
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return packed, absmax
    rows = max(1, tile_elements(_TILE_ELEMENTS) // blocksize)
    with on_device(x):
        _quantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
            x, packed, absmax, _thresholds(quant_type, x.device), n, nblocks,
            BLOCKSIZE=blocksize, ROWS=rows, QUANT_TYPE=_QT[quant_type],
            IS_BF16=x.dtype == torch.bfloat16)
    return packed, absmax
