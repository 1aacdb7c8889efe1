"""User-facing quantize / dequantize functions.

Example:
    >>> import torch, qlora_kernels as qk
    >>> w = torch.randn(256, 128, dtype=torch.bfloat16)
    >>> packed, state = qk.quantize_4bit(w, blocksize=64, quant_type="nf4")
    >>> qk.dequantize_4bit(packed, state).shape
    torch.Size([256, 128])
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import ops  # noqa: F401  (registers fakes and fallbacks)
from .backends import backend_for_call
from .formats import (NESTED_BLOCKSIZE, check_blocksize, check_out_dtype, check_quant_type,
                      get_4bit_code, get_dq_code)
from .op_checks import check_float_input
from .aliases import pick
from .packed_storage import packed_to_storage, storage_to_packed
from .quant_state import QuantState


def _raise_if_not_finite(absmax: torch.Tensor, blocksize: int, what: str) -> None:
    bad = ~torch.isfinite(absmax)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: input contains NaN or Inf; first bad block is {first} "
            f"(flat elements {first * blocksize}..{(first + 1) * blocksize - 1}, "
            f"{int(bad.sum())} bad blocks in all)")


def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256,
                       backend: Optional[str] = None):
    """Blockwise 8-bit quantization with a sorted 256-entry ``code`` (default: the signed
    dynamic map). Returns ``(q uint8 [numel], absmax float32 [nblocks])``.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> q, absmax = qk.quantize_blockwise(torch.randn(1000))
        >>> q.dtype, absmax.shape
        (torch.uint8, torch.Size([4]))
    """
    check_float_input(A, "quantize_blockwise")
    code = get_dq_code("dynamic" if code is None else code).to(A.device)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    with backend_for_call(A.device, backend):
        q, absmax = torch.ops.qlora_kernels.quantize_8bit(A.reshape(-1), code, int(blocksize))
    _raise_if_not_finite(absmax, blocksize, "quantize_blockwise")
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: Optional[torch.Tensor] = None,
                         blocksize: int = 256, dtype: torch.dtype = torch.float32,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: ``code[q] * absmax[i // blocksize]``, flat.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> x = torch.randn(1000)
        >>> (qk.dequantize_blockwise(*qk.quantize_blockwise(x)) - x).abs().max() < 0.05
        tensor(True)
    """
    check_out_dtype(dtype, "dequantize_blockwise")
    code = get_dq_code("dynamic" if code is None else code).to(q.device)
    with backend_for_call(q.device, backend):
        return torch.ops.qlora_kernels.dequantize_8bit(q.reshape(-1), absmax, code,
                                                       int(blocksize), dtype)


def double_quantize_absmax(absmax: torch.Tensor, dq_code: Union[str, torch.Tensor] = "fp8",
                           backend: Optional[str] = None):
    """Quantize float32 absmax values to 8 bits in blocks of 256 around their mean.

    Returns ``(qabsmax uint8, offset float, nested QuantState)``.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> q, offset, s2 = qk.double_quantize_absmax(torch.rand(1000) + 1)
        >>> q.dtype, s2.absmax.shape
        (torch.uint8, torch.Size([4]))
    """
    offset = float(absmax.float().mean()) if absmax.numel() else 0.0  # (an empty weight)
    if not math.isfinite(offset):  # finite scales near 3e38 overflow a float32 sum
        offset = float(absmax.double().mean())
    code = get_dq_code(dq_code).to(absmax.device)
    q, scale2 = quantize_blockwise(absmax.float() - offset, code, NESTED_BLOCKSIZE, backend)
    state2 = QuantState(absmax=scale2, shape=None, dtype=torch.float32,
                        blocksize=NESTED_BLOCKSIZE, quant_type="8bit", code=code)
    return q, offset, state2


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: Optional[bool] = None, dq_code: Union[str, torch.Tensor] = "fp8",
                  backend: Optional[str] = None, *, compress_statistics: Optional[bool] = None,
                  quant_storage: torch.dtype = torch.uint8):
    """Blockwise 4-bit quantization in the bitsandbytes layout.

    ``A`` is float32/float16/bfloat16 of any shape (read as flat, non-contiguous is fine).
    Returns ``(packed, state)``: packed uint8 of shape ``((numel + 1) // 2, 1)`` and a
    ``QuantState``. With ``double_quant`` the absmax is stored as 8 bits
    (``dq_code``: "fp8" E4M3 by default, or "dynamic", or a 256-entry table).
    bitsandbytes' names work too: ``compress_statistics`` for ``double_quant`` (default
    True), and ``quant_storage`` returns the packed bytes viewed as that dtype.

    Raises TypeError for non-float input, ValueError for an unsupported blocksize or
    quant_type, and ValueError naming the first block holding NaN or Inf.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> packed, state = qk.quantize_4bit(torch.randn(333, 77), quant_type="fp4")
        >>> packed.shape, state.shape
        (torch.Size([12821, 1]), torch.Size([333, 77]))
    """
    double_quant = pick("double_quant", double_quant, "compress_statistics", compress_statistics,
                        default=True)
    check_float_input(A, "quantize_4bit")
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    with backend_for_call(A.device, backend):
        packed, absmax = torch.ops.qlora_kernels.quantize_4bit(A.reshape(-1), int(blocksize),
                                                               quant_type)
    _raise_if_not_finite(absmax, blocksize, "quantize_4bit")
    code = get_4bit_code(quant_type, A.device)
    state = QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=int(blocksize),
                       quant_type=quant_type, code=code)
    if double_quant:
        qabsmax, offset, state2 = double_quantize_absmax(absmax, dq_code, backend)
        state.absmax, state.offset, state.state2 = qabsmax, offset, state2
    if quant_storage != torch.uint8:
        packed = packed_to_storage(packed, quant_storage)
    return packed, state


def dequantize_absmax(state: QuantState, backend: Optional[str] = None) -> torch.Tensor:
    """The float32 per-block absmax of a state, decoding double quantization if present.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> _, s = qk.quantize_4bit(torch.randn(128))
        >>> qk.dequantize_absmax(s).dtype
        torch.float32
    """
    if not state.nested:
        return state.absmax
    s2 = state.state2
    scale = dequantize_blockwise(state.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32,
                                 backend)
    return scale + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None,
                    backend: Optional[str] = None, out: Optional[torch.Tensor] = None, *,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize ``packed`` to ``state.shape`` and ``state.dtype`` (or ``dtype``;
    ``out_dtype`` is its deprecated former name). ``packed`` may be stored as another dtype
    (``quantize_4bit(..., quant_storage=...)``).

    With a double-quantized state the 8-bit absmax is decoded inside the same kernel pass.
    ``out``: an optional preallocated contiguous tensor of ``state.numel`` elements (its
    dtype is the output dtype), written in place and returned viewed as ``state.shape``.
    Raises ValueError when ``packed`` and ``state`` (or ``out``) do not belong together.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> w = torch.randn(64, 64, dtype=torch.float16)
        >>> qk.dequantize_4bit(*qk.quantize_4bit(w)).dtype
        torch.float16
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_4bit: state must be a QuantState, got {type(state).__name__}")
    dtype = pick("dtype", dtype, "out_dtype", out_dtype, default=None, deprecated=True)
    if packed.dtype != torch.uint8:
        nbytes = (state.numel + 1) // 2
        if not 0 <= packed.numel() * packed.element_size() - nbytes < packed.element_size():
            raise ValueError(f"packed weight: expected uint8 (or a quant_storage view of its "
                             f"{nbytes} bytes), got {packed.numel()} {packed.dtype} values")
        packed = storage_to_packed(packed, nbytes)
    state.validate(packed)
    if packed.device != state.absmax.device:
        raise ValueError(f"dequantize_4bit: packed is on {packed.device} but its state on "
                         f"{state.absmax.device}; move both with .to(device)")
    dtype = dtype or state.dtype
    check_out_dtype(out.dtype if out is not None else dtype, "dequantize_4bit")
    absmax, code, blocksize, nested_absmax, nested_code, offset = state.op_args()
    if out is not None:
        if out.numel() != state.numel or not out.is_contiguous() or out.device != packed.device:
            raise ValueError(f"dequantize_4bit: out must be a contiguous tensor of {state.numel} "
                             f"elements on {packed.device}, got {tuple(out.shape)} on {out.device}")
        with backend_for_call(packed.device, backend):
            torch.ops.qlora_kernels.dequantize_4bit_out(packed, absmax, code, blocksize,
                                                        nested_absmax, nested_code, offset,
                                                        out.view(-1))
        return out.view(state.shape)
    with backend_for_call(packed.device, backend):
        out = torch.ops.qlora_kernels.dequantize_4bit(packed, absmax, code, blocksize,
                                                      state.numel, dtype, nested_absmax,
                                                      nested_code, offset)
    return out.view(state.shape)
