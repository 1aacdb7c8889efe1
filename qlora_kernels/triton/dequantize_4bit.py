"""Triton 4-bit blockwise dequantization, with the double-quantized absmax decoded in the
same kernel; bit-exact with ``qlora_kernels.backends.reference.dequantize_4bit``.

Kernel: one program turns BYTES packed bytes into 2*BYTES outputs. Both codes of a byte
belong to one block (blocksizes are even), so each byte needs one absmax. With a nested
state the uint8 absmax is decoded on the fly as ``(code8[q8] * scale2[b // 256]) + offset``,
two separately rounded float32 ops: the launch passes ``enable_fp_fusion=False`` so a GPU
compiler cannot contract them into an FMA (the reference and C++ kernels never do).
Grid: (ceil(nbytes / BYTES),).

Example:
    >>> import torch
    >>> from qlora_kernels.formats import get_4bit_code
    >>> from qlora_kernels.triton.quantize_4bit import quantize_4bit
    >>> from qlora_kernels.triton.dequantize_4bit import dequantize_4bit
    >>> p, a = quantize_4bit(torch.randn(100), 64, "nf4")                            # doctest: +SKIP
    >>> dequantize_4bit(p, a, get_4bit_code("nf4"), 64, 100, torch.float16).shape   # doctest: +SKIP
    torch.Size([100])
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import check_out_dtype
from ..op_checks import check_4bit_weight
from ._common import flat, on_device, tile_elements

_BYTES = 1024  # packed bytes per program on a GPU


# --- kernels ------------------------------------------------------------------------------
@triton.jit
def load_absmax(absmax_ptr, blk, mask, nested_absmax_ptr, nested_code_ptr, offset,
                NESTED: tl.constexpr):
    """The float32 absmax of blocks ``blk``; decodes a double-quantized (uint8) absmax as
    qk::decode_nested_absmax: a rounded multiply, then a rounded add."""
    if NESTED:
        q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0.0)
        a = tl.load(nested_code_ptr + q8) * scale2
        a = a + offset
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def cast_rn(v, DTYPE: tl.constexpr):
    """Round float32 ``v`` to DTYPE to nearest-even, as torch's ``.to(dtype)`` does.

    float32 -> bfloat16 is done on the bits: Triton's interpreter truncates that
    conversion, which would break bit-exactness in the CPU tests; on a GPU this gives the
    same result as cvt.rn.bf16.f32 for a few integer ops. NaN becomes torch's 0x7FC0."""
    if DTYPE == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(DTYPE)
    return out


@triton.jit
def unpack_codes(byte):
    """High nibble (element 2j) and low nibble (element 2j+1) of packed bytes, as int32."""
    b = byte.to(tl.int32)
    return b >> 4, b & 0xF


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                            nested_code_ptr, offset, out_ptr, numel, nbytes,
                            BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr,
                            NESTED: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    jmask = j < nbytes
    hi, lo = unpack_codes(tl.load(packed_ptr + j, mask=jmask, other=0))
    a = load_absmax(absmax_ptr, (2 * j) // BLOCKSIZE, jmask, nested_absmax_ptr,
                    nested_code_ptr, offset, NESTED)
    v0 = tl.load(code_ptr + hi) * a
    v1 = tl.load(code_ptr + lo) * a
    # interleave to [2*BYTES] = v0[0], v1[0], v0[1], ... for one contiguous store
    v = tl.reshape(tl.join(v0, v1), (2 * BYTES,))
    i = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + i, cast_rn(v, out_ptr.dtype.element_ty), mask=i < numel)


# --- launchers ----------------------------------------------------------------------------
def dequantize_4bit_out(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int, nested_absmax: Optional[torch.Tensor],
                        nested_code: Optional[torch.Tensor], offset: float,
                        out: torch.Tensor) -> None:
    """Dequantize into ``out`` (contiguous; its dtype is the output dtype, its numel the
    element count).

    Example:
        >>> out = torch.empty(100, dtype=torch.bfloat16)
        >>> dequantize_4bit_out(p, a, get_4bit_code("nf4"), 64, None, None, 0.0, out)  # doctest: +SKIP
    """
    numel = out.numel()
    check_out_dtype(out.dtype, "dequantize_4bit")
    check_4bit_weight("dequantize_4bit", packed, absmax, code, blocksize, numel,
                      nested_absmax, nested_code)
    if not out.is_contiguous():
        raise ValueError("dequantize_4bit: out must be contiguous")
    if out.device != packed.device:
        raise ValueError(f"dequantize_4bit: out is on {out.device} but packed on {packed.device}")
    if numel == 0:
        return
    nbytes = packed.numel()
    nested = nested_absmax is not None
    with on_device(packed):
        nb = tile_elements(_BYTES)
        _dequantize_4bit_kernel[(triton.cdiv(nbytes, nb),)](
            flat(packed), flat(absmax), flat(code), flat(nested_absmax), flat(nested_code),
            float(offset), out, numel, nbytes,
            BLOCKSIZE=blocksize, BYTES=nb, NESTED=nested, enable_fp_fusion=False)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    blocksize: int, numel: int, dtype: torch.dtype,
                    nested_absmax: Optional[torch.Tensor] = None,
                    nested_code: Optional[torch.Tensor] = None,
                    offset: float = 0.0) -> torch.Tensor:
    """Dequantize to a new flat tensor of ``numel`` elements of ``dtype``:
    ``code[q] * absmax[i // blocksize]`` in float32, rounded once.

    Example:
        >>> dequantize_4bit(p, a, get_4bit_code("nf4"), 64, 100, torch.float32).shape  # doctest: +SKIP
        torch.Size([100])
    """
    check_out_dtype(dtype, "dequantize_4bit")
    if numel < 0:
        raise ValueError(f"dequantize_4bit: numel must be >= 0, got {numel}")
    out = torch.empty(int(numel), dtype=dtype, device=packed.device)
    dequantize_4bit_out(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, out)
    return out
