"""Fused AdamW step in Triton: one program per BLOCK elements, float32 state.

The element update is the one of csrc/include/qk_adamw.h (torch.optim.AdamW's op order,
explicit FMAs for lerp and addcmul, IEEE division and sqrt, no other contraction), so the
Triton, CUDA and CPU kernels agree. Scalars are computed in double and rounded to float32
once, as torch does.

Example:
    >>> import torch
    >>> from qlora_kernels.triton.adamw import adamw_step_
    >>> p, g, m, v = torch.ones(8), torch.full((8,), 0.5), torch.zeros(8), torch.zeros(8)
    >>> adamw_step_(p, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, False)  # doctest: +SKIP
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._common import on_device
from .dequantize_4bit import cast_rn


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, decay, w, beta2, c2, bc2_sqrt, eps,
                  neg_step_size, W1_SMALL: tl.constexpr, MAXIMIZE: tl.constexpr,
                  APPLY_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    p = p_raw.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if MAXIMIZE:
        g = -g
    if APPLY_DECAY:
        p = p * decay
    d = g - m
    if W1_SMALL:  # torch's lerp: start + w*(end-start), else end + (w-1)*(end-start)
        m = tl.fma(w, d, m)
    else:
        m = tl.fma(w, d, g)
    v = tl.fma(c2 * g, g, v * beta2)
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.math.div_rn(neg_step_size * m, denom)
    # cast_rn, not a plain cast: the interpreter's bfloat16 cast truncates, and a NaN must
    # stay NaN whatever its payload (a GPU's 0x7FFFFFFF would round to -0.0 by the bits)
    tl.store(p_ptr + offs, cast_rn(p, p_raw.dtype), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, step: int, maximize: bool,
                block: int = 1024) -> None:
    """One AdamW step in place (signature of ``qlora_kernels::adamw_step_``)."""
    n = param.numel()
    if step < 1:
        raise ValueError(f"adamw_step_: step must be >= 1, got {step}")
    if not (param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("adamw_step_: param, exp_avg and exp_avg_sq must be contiguous")
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError("adamw_step_: exp_avg and exp_avg_sq must be float32")
    if grad.numel() != n or exp_avg.numel() != n or exp_avg_sq.numel() != n:
        raise ValueError(f"adamw_step_: grad and state must have {n} elements like param")
    if n == 0:
        return
    grad = grad.contiguous()
    w1 = _f32(1.0 - beta1)
    small = abs(w1) < 0.5
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    grid = (triton.cdiv(n, block),)
    with on_device(param):
        _adamw_kernel[grid](param, grad, exp_avg, exp_avg_sq, n, _f32(1.0 - lr * weight_decay),
                            w1 if small else _f32(w1 - 1.0), _f32(beta2), _f32(1.0 - beta2),
                            _f32(bc2 ** 0.5), _f32(eps), _f32(-(lr / bc1)), W1_SMALL=small,
                            MAXIMIZE=bool(maximize), APPLY_DECAY=weight_decay != 0.0,
                            BLOCK=block,
                            enable_fp_fusion=False)  # p*decay + update must not become one FMA
