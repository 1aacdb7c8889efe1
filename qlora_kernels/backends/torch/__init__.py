"""Pure-PyTorch reference implementations of every op: the test oracle, and the fallback
when the compiled extension is missing.

They follow shared/FORMAT.md literally and favour clarity over speed. Signatures match
the ``qlora_kernels::*`` op schemas in csrc/ops.cpp.

Example:
    >>> import torch
    >>> from qlora_kernels.backends import torch as ref
    >>> packed, absmax = ref.quantize_4bit(torch.randn(100), 64, "nf4")
    >>> packed.shape, absmax.shape
    (torch.Size([50, 1]), torch.Size([2]))
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...formats import (NESTED_BLOCKSIZE, encode_thresholds, fp4_rank_to_pattern,
                        check_blocksize, check_out_dtype, check_quant_type)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = x.numel()
    nblocks = -(-n // blocksize)
    return F.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)


def _absmax_and_inverse(xb: torch.Tensor):
    absmax = xb.abs().amax(dim=1)  # NaN propagates, Inf stays: the caller checks
    inv = torch.where(absmax > 0, torch.ones_like(absmax).div(absmax), torch.zeros_like(absmax))
    return absmax, inv


def encode_4bit(s: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest code index of scaled values s (ties to the lower index), as int64.

    NaN maps to 0, as in the C++ header (every comparison with NaN is false); callers
    reject NaN input anyway.
    """
    thr = encode_thresholds(quant_type).to(s.device)
    if quant_type == "fp4":
        rank = torch.bucketize(s.abs(), thr)  # count of thresholds strictly below
        codes = fp4_rank_to_pattern(rank) | torch.where(s < 0, 8, 0)
    else:
        codes = torch.bucketize(s, thr)
    return torch.where(torch.isnan(s), 0, codes)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes -> uint8 [(n+1)//2, 1]; element 2j in the high nibble."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 packed bytes -> int64 codes of `numel` elements."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_4bit: input must be float32, float16 or bfloat16, got {A.dtype}")
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    x = A.reshape(-1).float()
    n = x.numel()
    xb = _blocks(x, blocksize)
    absmax, inv = _absmax_and_inverse(xb)
    codes = encode_4bit(xb * inv[:, None], quant_type).view(-1)[:n]
    return pack_4bit(codes), absmax


def dequantize_nested_absmax(qabsmax, nested_absmax, nested_code, offset: float) -> torch.Tensor:
    """absmax[i] = code8[q8[i]] * scale2[i // 256] + offset (multiply, then add)."""
    n = qabsmax.numel()
    scale = nested_absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[:n]
    return nested_code.float()[qabsmax.reshape(-1).long()] * scale + float(offset)


def dequantize_4bit(packed, absmax, code, blocksize: int, numel: int, dtype: torch.dtype,
                    nested_absmax: Optional[torch.Tensor] = None,
                    nested_code: Optional[torch.Tensor] = None, offset: float = 0.0):
    check_out_dtype(dtype, "dequantize_4bit")
    if nested_absmax is not None:
        absmax = dequantize_nested_absmax(absmax, nested_absmax, nested_code, offset)
    codes = unpack_4bit(packed, numel)
    scale = absmax.float().reshape(-1).repeat_interleave(blocksize)[:numel]
    return (code.float()[codes] * scale).to(dtype)


def dequantize_4bit_out(packed, absmax, code, blocksize: int, nested_absmax, nested_code,
                        offset: float, out: torch.Tensor) -> None:
    out.copy_(dequantize_4bit(packed, absmax, code, blocksize, out.numel(), out.dtype,
                              nested_absmax, nested_code, offset).view(out.shape))


def quantize_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_8bit: input must be float32, float16 or bfloat16, got {A.dtype}")
    x = A.reshape(-1).float()
    n = x.numel()
    xb = _blocks(x, blocksize)
    absmax, inv = _absmax_and_inverse(xb)
    code = code.float()
    mids = (code[:-1] + code[1:]) * 0.5
    s = xb * inv[:, None]
    q = torch.where(torch.isnan(s), 0, torch.bucketize(s, mids)).view(-1)[:n]
    return q.to(torch.uint8), absmax


def dequantize_8bit(q, absmax, code, blocksize: int, dtype: torch.dtype):
    check_out_dtype(dtype, "dequantize_8bit")
    n = q.numel()
    scale = absmax.float().reshape(-1).repeat_interleave(blocksize)[:n]
    return (code.float()[q.reshape(-1).long()] * scale).to(dtype)


def gemv_4bit(x, packed, absmax, code, blocksize: int, out_features: int,
              nested_absmax=None, nested_code=None, offset: float = 0.0, bias=None):
    """y[M, N] = x[M, K] @ W^T (+ bias) in float32, returned in x's dtype."""
    k = x.shape[-1]
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features * k, torch.float32,
                        nested_absmax, nested_code, offset).view(out_features, k)
    y = x.float() @ w.T
    return (y if bias is None else y + bias.float()).to(x.dtype)
