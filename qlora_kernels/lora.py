"""``QLoRALinear``: a frozen (4-bit or dense) linear layer plus a trainable low-rank update.

``y = base(x) + scale * B(A(dropout(x)))`` with ``scale = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with rsLoRA). The attribute names follow PEFT's LoRA layer
(``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``) so that module paths
and adapter keys line up with a PEFT model of the same base (see adapters.py).

Memory: over a 4-bit base with adapters in its compute dtype, one fused autograd Function
computes the layer (lora_fused.py): it saves x, ``x·Aᵀ`` and the packed weight (plus one
boolean mask with dropout), never a dequantized W. Other combinations (a dense base, float32
adapters over a bf16 base, a sharded weight) compose the base layer and two ``nn.Linear``.

Example:
    >>> import torch, qlora_kernels as qk
    >>> base = qk.Linear4bit.from_linear(torch.nn.Linear(128, 64))
    >>> layer = qk.QLoRALinear(base, r=8, lora_alpha=16)
    >>> torch.equal(layer(torch.ones(2, 128)), base(torch.ones(2, 128)))  # B starts at zero
    True
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .lora_fused import qlora_linear
from .nn import Linear4bit
from .nn.linear4bit import is_dtensor

_INITS = ("kaiming", "gaussian")


def _base_dtypes(base: nn.Module):
    """(compute dtype, original weight dtype) of a Linear4bit or nn.Linear base layer."""
    if isinstance(base, Linear4bit):
        return base.compute_dtype or base.weight_dtype, base.weight_dtype
    return base.weight.dtype, base.weight.dtype


class QLoRALinear(nn.Module):
    """A LoRA adapter around a frozen ``Linear4bit`` (QLoRA) or ``nn.Linear`` (LoRA).

    Args:
        base: the frozen layer (its parameters are set to ``requires_grad=False``).
        r: adapter rank (> 0).
        lora_alpha: scale numerator; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` if rsLoRA).
        lora_dropout: dropout probability on the adapter's input only.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init: ``"kaiming"`` (PEFT's default: A ~ Kaiming-uniform with a=sqrt(5)) or
            ``"gaussian"`` (A ~ N(0, 1/r)); B is zero either way, so a fresh wrapper leaves
            the base output unchanged.
        adapter_dtype: dtype of A and B; default the base's compute dtype (for a
            ``Linear4bit`` without one, its original weight dtype). Pass ``torch.float32``
            for float32 adapters.

    Only ``lora_A.weight`` and ``lora_B.weight`` require grad.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> layer = qk.QLoRALinear(torch.nn.Linear(32, 16), r=4, lora_alpha=8)
        >>> [n for n, p in layer.named_parameters() if p.requires_grad]
        ['lora_A.weight', 'lora_B.weight']
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming",
                 adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, (Linear4bit, nn.Linear)):
            raise TypeError(f"QLoRALinear wraps a Linear4bit or nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"QLoRALinear: r must be a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"QLoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        if init not in _INITS:
            raise ValueError(f"QLoRALinear: init must be one of {_INITS}, got {init!r}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.use_rslora = int(r), float(lora_alpha), bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        compute_dtype, _ = _base_dtypes(base)
        dtype = adapter_dtype or compute_dtype
        if not dtype.is_floating_point:
            raise ValueError(f"QLoRALinear: adapter_dtype must be floating point, got {dtype}")
        device = base.weight.device
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Re-initialise A (Kaiming-uniform a=sqrt(5), or N(0, 1/r)) and zero B.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> layer = qk.QLoRALinear(torch.nn.Linear(8, 8), r=2, lora_alpha=2)
            >>> layer.reset_lora_parameters("gaussian"); bool(layer.lora_B.weight.any())
            False
        """
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                raise ValueError(f"init must be one of {_INITS}, got {init!r}")
            nn.init.zeros_(self.lora_B.weight)

    @property
    def compute_dtype(self) -> torch.dtype:
        return _base_dtypes(self.base_layer)[0]

    def set_scale(self, lora_alpha: float, use_rslora: Optional[bool] = None) -> None:
        """Change ``lora_alpha`` (and rsLoRA) and recompute ``scaling``."""
        if use_rslora is not None:
            self.use_rslora = bool(use_rslora)
        self.lora_alpha = float(lora_alpha)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def _fused_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The compute dtype when the fused Function (lora_fused.py) computes this layer: a
        4-bit base whose adapters are in its compute dtype, on a plain (unsharded) weight."""
        base = self.base_layer
        if not isinstance(base, Linear4bit) or is_dtensor(base.weight):
            return None
        cdt = base.compute_dtype or x.dtype
        a = self.lora_A.weight
        if a.dtype != cdt or self.lora_B.weight.dtype != cdt or x.shape[-1] != self.in_features:
            return None
        return cdt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = self._fused_dtype(x) if x.is_floating_point() else None
        if cdt is not None:
            base = self.base_layer
            drop = self.lora_dropout
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            bias = None if base.bias is None else base.bias.to(cdt)
            y = qlora_linear(x.to(cdt), base.packed_weight, base.quant_state, self.lora_A.weight,
                             self.lora_B.weight, self.scaling, bias, p)
            return y.to(x.dtype)
        y = self.base_layer(x)
        a = self.lora_A.weight
        # The adapter runs in its own dtype; the sum is taken in the base output's dtype.
        h = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (h * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` as a float32 (out, in) tensor.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> qk.QLoRALinear(torch.nn.Linear(8, 4), r=2, lora_alpha=2).delta_weight().shape
            torch.Size([4, 8])
        """
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The float32 dense weight ``W + scale * B @ A`` (W dequantized for a 4-bit base)."""
        base = self.base_layer
        w = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight.float()
        return w + self.delta_weight()

    def merge(self, requantize: bool = False, dtype: Optional[torch.dtype] = None
              ) -> Union[nn.Linear, Linear4bit]:
        """A new layer equal to this one: a dense ``nn.Linear``, or with ``requantize=True``
        a ``Linear4bit`` with the base's quantization settings. The merge is computed in
        float32 and rounded once to ``dtype``, by default the dtype the base weight had
        before quantization (the dtype the surrounding model runs in; for the usual bf16
        model loaded with compute_dtype=bf16 that is the compute dtype).

        Example:
            >>> import torch, qlora_kernels as qk
            >>> layer = qk.QLoRALinear(qk.Linear4bit.from_linear(torch.nn.Linear(64, 32)), 4, 8)
            >>> type(layer.merge()).__name__, type(layer.merge(requantize=True)).__name__
            ('Linear', 'Linear4bit')
        """
        base = self.base_layer
        compute_dtype, weight_dtype = _base_dtypes(base)
        w = self.merged_weight()
        dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                          device=w.device, dtype=dtype or weight_dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        del w
        dense.requires_grad_(False)
        if not requantize:
            return dense
        if isinstance(base, Linear4bit):
            out = Linear4bit.from_linear(
                dense, quant_type=base.quant_type, blocksize=base.blocksize,
                double_quant=base.double_quant, compute_dtype=base.compute_dtype,
                dq_code=base.nested_quant_map if base.double_quant else "fp8")
        else:
            out = Linear4bit.from_linear(dense, compute_dtype=compute_dtype)
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, "
                f"use_rslora={self.use_rslora}, adapter_dtype={self.lora_A.weight.dtype}")
