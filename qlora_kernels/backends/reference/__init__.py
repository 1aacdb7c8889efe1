"""Pure-PyTorch reference implementations of every op: the test oracle, and the fallback
when the compiled extension is missing.

They follow shared/FORMAT.md literally and favour clarity over speed. Signatures match
the ``qlora_kernels::*`` op schemas in csrc/ops.cpp.

``override_impls()`` gives every op's reference implementation, registered over the
compiled kernels while the reference is selected (``qk.use_backend("reference")``);
``fallback_impls()`` those that stand in where no compiled kernel exists.

Example:
    >>> import torch
    >>> from qlora_kernels.backends import reference as ref
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
from ...op_checks import (check_4bit_weight, check_dequantize_8bit_args, check_float_input,
                          check_quantize_8bit_args)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = x.numel()
    nblocks = -(-n // blocksize)
    return F.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)


def _absmax_and_inverse(xb: torch.Tensor):
    absmax = xb.abs().amax(dim=1)  # NaN propagates, Inf stays: the caller checks
    inv = torch.where(absmax > 0, torch.ones_like(absmax).div(absmax), torch.zeros_like(absmax))
    return absmax, inv


def encode_4bit(s: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Code index of scaled values s, as int64: the count of thresholds t with s > t
    (bitsandbytes' comparisons, ties to the lower index).

    NaN maps to 0, as in the C++ header and bitsandbytes (every comparison with NaN is
    false); it arises from an all-zero block (0 * (1/0)) and from NaN input.
    """
    thr = encode_thresholds(quant_type).to(s.device)
    if quant_type == "fp4":
        rank = torch.bucketize(s.abs(), thr)  # count of thresholds strictly below
        codes = fp4_rank_to_pattern(rank) | torch.where(s < 0, 8, 0)
    else:
        codes = torch.bucketize(s, thr)
    return torch.where(torch.isnan(s), 0, codes)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes -> uint8 [(n+1)//2, 1]; element 2j in the high nibble. An odd count holds
    the pad code as its last element already (``quantize_4bit`` encodes a padded 0.0)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        raise ValueError("pack_4bit needs an even number of codes (pad with the code of 0.0)")
    return ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 packed bytes -> int64 codes of `numel` elements."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    check_float_input(A, "quantize_4bit")
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    x = A.reshape(-1).float()
    n = x.numel()
    xb = _blocks(x, blocksize)  # the padding is 0.0, encoded like bitsandbytes' kernel
    absmax = xb.abs().amax(dim=1)
    inv = torch.ones_like(absmax) / absmax  # no zero guard: 0 * inf = NaN -> code 0, as bnb
    codes = encode_4bit(xb * inv[:, None], quant_type).view(-1)[: n + n % 2]
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
    check_4bit_weight("dequantize_4bit", packed, absmax, code, blocksize, numel,
                      nested_absmax, nested_code)
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
    check_quantize_8bit_args(A, code, blocksize)
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
    check_dequantize_8bit_args(q, absmax, code, blocksize, dtype)
    n = q.numel()
    scale = absmax.float().reshape(-1).repeat_interleave(blocksize)[:n]
    return (code.float()[q.reshape(-1).long()] * scale).to(dtype)


def _float32_weight(op, packed, absmax, code, blocksize, n, k, nested_absmax, nested_code,
                    offset):
    check_4bit_weight(op, packed, absmax, code, blocksize, n * k, nested_absmax, nested_code)
    return dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.float32,
                           nested_absmax, nested_code, offset).view(n, k)


def gemv_4bit(x, packed, absmax, code, blocksize: int, out_features: int,
              nested_absmax=None, nested_code=None, offset: float = 0.0, bias=None,
              op: str = "gemv_4bit"):
    """y[M, N] = x[M, K] @ W^T (+ bias) in float32, returned in x's dtype."""
    check_float_input(x, op)
    w = _float32_weight(op, packed, absmax, code, blocksize, out_features, x.shape[-1],
                        nested_absmax, nested_code, offset)
    y = x.float() @ w.T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def matmul_4bit(x, packed, absmax, code, blocksize: int, out_features: int,
                nested_absmax=None, nested_code=None, offset: float = 0.0, bias=None):
    """x[..., K] @ W^T (+ bias): the whole W dequantized to float32, then one matmul."""
    return gemv_4bit(x, packed, absmax, code, blocksize, out_features, nested_absmax,
                     nested_code, offset, bias, op="matmul_4bit")


def matmul_4bit_backward(grad_y, packed, absmax, code, blocksize: int, in_features: int,
                         nested_absmax=None, nested_code=None, offset: float = 0.0):
    """grad_y[..., N] @ W -> [..., K] in float32, returned in grad_y's dtype."""
    w = _float32_weight("matmul_4bit_backward", packed, absmax, code, blocksize,
                        grad_y.shape[-1], in_features, nested_absmax, nested_code, offset)
    return (grad_y.float() @ w).to(grad_y.dtype)


def dequantize_4bit_cols_out(packed, absmax, code, blocksize: int, nested_absmax, nested_code,
                             offset: float, row_len: int, col0: int, out) -> None:
    """Columns [col0, col0 + out.shape[1]) of the (out.shape[0], row_len) weight into out."""
    rows, cols = out.shape
    w = dequantize_4bit(packed, absmax, code, blocksize, rows * row_len, out.dtype,
                        nested_absmax, nested_code, offset)
    out.copy_(w.view(rows, row_len)[:, col0:col0 + cols])


_WORD = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """The uint32 mixer of dropout_seeded, on int64 values below 2**32 (each product stays
    below 2**63: the constants are below 2**31)."""
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _WORD
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _WORD
    return h ^ (h >> 15)


def dropout_seeded(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x with each element kept (times 1 / P(keep)) or zeroed by a hash of (seed, index),
    as op_schemas.inc defines it."""
    check_float_input(x, "dropout_seeded")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_seeded: p must be in [0, 1), got {p}")
    levels = 1 << 32
    drop = min(round(p * levels), levels - 1)
    scale = torch.tensor(levels / (levels - drop), dtype=torch.float32)
    key = seed & ((1 << 64) - 1)
    i = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    h = _mix32((i & _WORD) ^ (key & _WORD) ^ (((i >> 32) * 0x9E3779B1) & _WORD))
    keep = _mix32(h ^ (key >> 32)) >= drop
    return torch.where(keep.view(x.shape), x, 0) * scale.item()


# Without the extension there is no SIMD path: the scalar (reference) one only.
def cpu_features() -> int:
    return 0


def cpu_isa() -> int:
    return 0


def set_cpu_isa(isa: int) -> int:
    if isa > 0:
        raise RuntimeError("set_cpu_isa: the compiled extension is not loaded (scalar path only)")
    return 0


# Without the extension torch's own CPU allocator stays: no block cache to turn on.
def cpu_block_cache_enable(enable: bool) -> None:
    if enable:
        raise RuntimeError("cpu_block_cache_enable: the compiled extension is not loaded")


def cpu_block_cache_stats() -> list:
    return [0, 0, 0, 0, 0, 0]


from . import adamw  # noqa: E402  (it uses the 8-bit functions above)

_QUANT_OPS = ("quantize_4bit", "dequantize_4bit", "dequantize_4bit_out",
              "dequantize_4bit_cols_out", "quantize_8bit", "dequantize_8bit", "gemv_4bit")
_LORA_OPS = ("dropout_seeded",)
_OPTIM_OPS = ("adamw_step_", "adamw_step_multi_", "adamw8bit_step_")
MANAGED_OPS = ("managed_supported", "managed_empty", "managed_prefetch_", "is_managed")
CPU_DISPATCH_OPS = ("cpu_features", "set_cpu_isa", "cpu_isa")
CPU_MEMORY_OPS = ("cpu_block_cache_enable", "cpu_block_cache_stats")
# Ops that take no tensor of a device (C++ registers them for every dispatch key): no CUDA
# stand-ins, no backend override.
DEVICELESS_OPS = MANAGED_OPS + CPU_DISPATCH_OPS + CPU_MEMORY_OPS


def fallback_impls() -> dict:
    """op name -> reference function, for every op with a compiled kernel somewhere (the
    matmul ops are composite, implemented once in matmul.py over these).

    Example:
        >>> sorted(fallback_impls())[:2]
        ['adamw8bit_step_', 'adamw_step_']
    """
    out = {name: globals()[name]
           for name in _QUANT_OPS + _LORA_OPS + CPU_DISPATCH_OPS + CPU_MEMORY_OPS}
    out.update({name: getattr(adamw, name) for name in _OPTIM_OPS + MANAGED_OPS})
    return out


def override_impls() -> dict:
    """op name -> reference function for every compute op, the matmul and its backward
    included (the managed-memory ops allocate memory, they compute nothing: not overridden).

    Example:
        >>> "matmul_4bit_backward" in override_impls()
        True
    """
    out = {name: f for name, f in fallback_impls().items() if name not in DEVICELESS_OPS}
    out.update(matmul_4bit=matmul_4bit, matmul_4bit_backward=matmul_4bit_backward)
    return out
