"""The fused QLoRA layer: one autograd Function for
``y = x·Ŵᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`` with Ŵ a 4-bit weight.

Against the module-by-module composition (base layer, dropout, two ``nn.Linear``, a scale,
an add) it saves for the backward only x itself (no copy when x is already in the compute
dtype), ``x·Aᵀ`` (r columns, computed once), when dropout is on a seed on the CPU (the
``dropout_seeded`` op recomputes the mask) or one boolean mask elsewhere (never a dropped
copy of x), and the packed weight; the base product (the ``matmul_4bit`` op,
left unmodified so that selective checkpointing can keep it, see checkpointing.py) and
the low-rank update are summed by one ``addmm``, and the input gradient of both is
accumulated in place in one tensor. A and B's gradients come out in their (compute) dtype from GEMMs that
accumulate in float32. The base product dequantizes W a tile at a time (matmul.py), so no
dequantized W outlives one GEMM.

Example:
    >>> import torch, qlora_kernels as qk
    >>> from qlora_kernels.lora_fused import qlora_linear
    >>> packed, state = qk.quantize_4bit(torch.randn(16, 32))
    >>> x, a, b = torch.randn(3, 32), torch.randn(4, 32), torch.randn(16, 4)
    >>> y = qlora_linear(x, packed, state, a, b, scaling=2.0)
    >>> w = qk.dequantize_4bit(packed, state)
    >>> torch.allclose(y, x @ w.T + 2.0 * (x @ a.T) @ b.T, atol=1e-4)
    True
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .matmul import _matmul_4bit_backward_impl
from .quant_state import QuantState


# Dropout draws 16 random bits per element, four elements per 64-bit draw: on the CPU
# torch's generator costs ~5 ns per draw, and a Bernoulli (or uniform) draw per element made
# the mask a sixth of the demo's training step (benchmarks/README.md). An element is dropped
# with probability k / 2**16, k = round(p * 2**16) (p to within 8e-6). CPU tensors take the
# dropout_seeded op instead (one pass, no mask); this mask serves the other devices, where
# the op's only kernel is the reference.
_MASK_LEVELS = 1 << 16
_SEEDED_DEVICES = ("cpu",)


def dropout_keep_mask(shape, p: float, device=None) -> Tuple[torch.Tensor, float]:
    """A boolean keep-mask of ``shape`` for dropout with probability ``p`` from torch's
    generator on ``device``, and the scale 1 / P(keep) for the kept elements.

    Example:
        >>> _ = torch.manual_seed(0); mask, scale = dropout_keep_mask((1000, 100), 0.25)
        >>> round(1 - mask.float().mean().item(), 2), round(scale, 4)
        (0.25, 1.3333)
    """
    numel = math.prod(shape)
    drop = min(max(int(round(p * _MASK_LEVELS)), 0), _MASK_LEVELS - 1)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # every bit uniform (random_() leaves the sign bit 0)
    lanes = words.view(torch.int16)[:numel].view(shape)
    return lanes >= drop - (1 << 15), _MASK_LEVELS / (_MASK_LEVELS - drop)


class _Dropout:
    """One draw of dropout with probability ``p``, applied as often as needed (to x in the
    forward, to x and to the gradient of the dropped x in the backward): on the CPU a seed
    for the ``dropout_seeded`` op, which recomputes the mask; elsewhere a saved mask
    (``dropout_keep_mask``), which the caller keeps (through ``ctx.save_for_backward``, so
    that checkpointing can drop it) and passes to ``apply``. ``draw`` makes one.

    Example:
        >>> _ = torch.manual_seed(0); d, mask = _Dropout.draw(torch.ones(4, 1000), 0.5)
        >>> y = d.apply(torch.ones(4, 1000), mask)
        >>> sorted(set(y.unique().tolist())), torch.equal(y, d.apply(torch.ones(4, 1000), mask))
        ([0.0, 2.0], True)
    """

    def __init__(self, p: float, seed: Optional[int] = None, scale: float = 1.0):
        self.p, self.seed, self.scale = p, seed, scale

    @classmethod
    def draw(cls, x: torch.Tensor, p: float) -> Tuple["_Dropout", Optional[torch.Tensor]]:
        """A draw for tensors of x's shape, from torch's generator on x's device, and its
        mask (None for a seeded draw)."""
        if x.device.type in _SEEDED_DEVICES:
            seed = torch.empty((), dtype=torch.int64).random_(-(1 << 63), None).item()
            return cls(p, seed=seed), None
        mask, scale = dropout_keep_mask(x.shape, p, x.device)
        return cls(p, scale=scale), mask

    def apply(self, t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.seed is not None:
            return torch.ops.qlora_kernels.dropout_seeded.default(t, self.seed, self.p)
        return torch.where(mask, t, 0).mul_(self.scale)


class _QLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, packed, absmax, code, nested_absmax, nested_code,
                blocksize, offset, scaling, dropout):
        k = x.shape[-1]
        n = lora_b.shape[0]
        x2 = x.reshape(-1, k)
        # Through the dispatcher (below autograd: this forward is not differentiated) so that
        # selective checkpointing (checkpointing.py) sees the op and can keep its output; the
        # output is then never written in place.
        with torch._C._AutoDispatchBelowAutograd():
            y = torch.ops.qlora_kernels.matmul_4bit.default(x2, packed, absmax, code, blocksize,
                                                            n, nested_absmax, nested_code,
                                                            offset, bias)
        drop, mask = _Dropout.draw(x2, dropout) if dropout > 0 else (None, None)
        xa = (x2 if drop is None else drop.apply(x2, mask)) @ lora_a.T
        y = torch.addmm(y, xa, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x2, xa, mask, lora_a, lora_b, packed, absmax, code, nested_absmax,
                              nested_code)
        ctx.blocksize, ctx.offset, ctx.scaling, ctx.drop = blocksize, offset, scaling, drop
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad):
        (x2, xa, mask, lora_a, lora_b, packed, absmax, code, nested_absmax,
         nested_code) = ctx.saved_tensors
        s, drop = ctx.scaling, ctx.drop
        g2 = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gb = g2 @ lora_b  # (m, r): the gradient reaching x·Aᵀ, unscaled
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul_4bit_backward_impl(g2, packed, absmax, code, ctx.blocksize,
                                                x2.shape[1], nested_absmax, nested_code,
                                                ctx.offset)
            if drop is None:
                grad_x.addmm_(gb, lora_a, alpha=s)
            else:
                grad_x.add_(drop.apply(gb @ lora_a, mask), alpha=s)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            xd = x2 if drop is None else drop.apply(x2, mask)
            grad_a = torch.mm(gb.T, xd).mul_(s)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g2.T, xa).mul_(s)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0)
        return (grad_x, grad_a, grad_b, grad_bias) + (None,) * 9


def qlora_linear(x: torch.Tensor, packed: torch.Tensor, state: QuantState, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, bias: Optional[torch.Tensor] = None,
                 dropout: float = 0.0) -> torch.Tensor:
    """``x·Ŵᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ`` in x's dtype, with Ŵ = ``(packed, state)``
    of shape (N, K), ``lora_a`` (r, K) and ``lora_b`` (N, r) in x's dtype; differentiable
    w.r.t. x, A, B and bias. ``dropout`` is the probability of zeroing an element of the
    adapter's input (0: none).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> packed, state = qk.quantize_4bit(torch.randn(8, 64))
        >>> a = torch.randn(2, 64, requires_grad=True); b = torch.zeros(8, 2, requires_grad=True)
        >>> qlora_linear(torch.randn(5, 64), packed, state, a, b, 1.0).sum().backward()
        >>> b.grad.shape, bool(a.grad.eq(0).all())
        (torch.Size([8, 2]), True)
    """
    n, k = state.shape
    if x.shape[-1] != k or lora_a.shape[1] != k or lora_b.shape != (n, lora_a.shape[0]):
        raise ValueError(f"qlora_linear: shapes do not chain: x {tuple(x.shape)}, W {n}x{k}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        raise TypeError(f"qlora_linear: A and B must have x's dtype {x.dtype}, got "
                        f"{lora_a.dtype} and {lora_b.dtype}")
    s2 = state.state2
    return _QLoRAFunction.apply(x, lora_a, lora_b, bias, packed, state.absmax, state.code,
                                None if s2 is None else s2.absmax,
                                None if s2 is None else s2.code, state.blocksize,
                                float(state.offset or 0.0), float(scaling), float(dropout))
