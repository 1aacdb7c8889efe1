"""Memory accounting: real bits per parameter of a packed tensor, and the QLoRA memory
estimator behind ``qlora-kernels memory``.

Example:
    >>> import qlora_kernels as qk
    >>> round(qk.estimate_memory(65e9).weights_nf4_dq_gb, 1)
    33.5
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable

import torch
from torch import nn

from .formats import NESTED_BLOCKSIZE
from .nn import Linear4bit
from .quant_state import QuantState


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantized_nbytes(packed: torch.Tensor, state: QuantState) -> int:
    """Bytes held by a packed 4-bit tensor and everything needed to decode it."""
    total = _nbytes(packed) + _nbytes(state.absmax) + _nbytes(state.code)
    if state.nested:
        total += _nbytes(state.state2.absmax) + _nbytes(state.state2.code) + 4  # + offset
    return total


def bits_per_parameter(packed: torch.Tensor, state: QuantState) -> float:
    """Real bits per parameter: packed codes + absmax + nested scales + tables, counted in
    full (they amortize to nothing on large tensors).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> round(qk.bits_per_parameter(*qk.quantize_4bit(torch.randn(4096, 4096))), 3)
        4.127
    """
    return 8.0 * quantized_nbytes(packed, state) / state.numel


def bits_per_parameter_formula(blocksize: int = 64, double_quant: bool = True) -> float:
    """4 + the scale overhead: 32/blocksize, or 8/blocksize + 32/(blocksize*256) with DQ.

    Example:
        >>> round(bits_per_parameter_formula(64, True), 3)
        4.127
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


# LLaMA-family shapes (hidden, intermediate, layers, kv fraction) for the LoRA count.
_LLAMA_SHAPES = {
    7e9: (4096, 11008, 32, 1.0),
    13e9: (5120, 13824, 40, 1.0),
    33e9: (6656, 17920, 60, 1.0),
    65e9: (8192, 22016, 80, 1.0),
    70e9: (8192, 28672, 80, 0.125),
}


@dataclass
class MemoryEstimate:
    """Bytes (as GB = 1e9 bytes) for QLoRA fine-tuning of a model with ``n_params``."""

    n_params: float
    weights_bf16_gb: float
    weights_nf4_gb: float
    weights_nf4_dq_gb: float
    lora_params: float
    lora_weights_gb: float
    lora_grads_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    world_size: int = 1
    # FSDP2 layout (``fsdp=True``; zero otherwise): the per-device share of the 4-bit codes,
    # the replicated quantization state (absmax, nested scales, tables), and the transient
    # all-gathered decoder layers (the one computing and the one prefetched).
    weights_sharded_gb: float = 0.0
    quant_state_gb: float = 0.0
    unsharded_layers_gb: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _shapes(n_params: float, shapes=None):
    """The LLaMA shapes of the table entry within 25% of ``n_params``; for other sizes,
    LLaMA-7B's proportions scaled to the size (intermediate = 2.6875 hidden, hidden / 128
    layers, so params = layers * 12.06 hidden^2), hidden rounded to a multiple of 64.

    Example:
        >>> _shapes(7e9), _shapes(135e6)
        ((4096, 11008, 32, 1.0), (1152, 3072, 8, 1.0))
    """
    if shapes is not None:
        return tuple(shapes)
    nearest = min(_LLAMA_SHAPES, key=lambda k: abs(k - n_params))
    if 0.8 <= n_params / nearest <= 1.25:
        return _LLAMA_SHAPES[nearest]
    per_h3 = (2 + 2 + 3 * 2.6875) / 128  # linear params per hidden^3 (layers = hidden / 128)
    h = max(64, round((n_params / per_h3) ** (1 / 3) / 64) * 64)
    return (h, round(2.6875 * h / 64) * 64, max(1, round(n_params / (per_h3 * 128 * h * h))), 1.0)


def check_memory_args(n_params, r, world_size) -> None:
    """ValueError unless ``n_params`` is a finite count > 0, ``r`` an integer >= 1 and
    ``world_size`` an integer >= 1 (``qlora-kernels memory`` exits 2 with the message).

    Example:
        >>> check_memory_args(float("nan"), 64, 1)
        Traceback (most recent call last):
        ValueError: params must be a finite number > 0, got nan
    """
    if isinstance(n_params, bool) or not isinstance(n_params, (int, float)) or \
            not math.isfinite(n_params) or n_params <= 0:
        raise ValueError(f"params must be a finite number > 0, got {n_params!r}")
    for name, value in (("r", r), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def linear_params_per_layer(shapes) -> int:
    """Weights of the seven linear layers of one LLaMA decoder layer, from
    ``shapes = (hidden, intermediate, layers, kv_fraction)``.

    Example:
        >>> linear_params_per_layer((4096, 11008, 32, 1.0)) / 1e6
        202.375168
    """
    h, i, _, kv = shapes
    return 2 * h * h + 2 * h * int(h * kv) + 3 * h * i


def lora_param_count(n_params: float, r: int = 64, shapes=None) -> float:
    """LoRA parameters (A and B) on all linear layers of the LLaMA model closest in size
    (or of ``shapes = (hidden, intermediate, layers, kv_fraction)``):
    r * (in + out) per linear, q/k/v/o and gate/up/down in every layer.

    Example:
        >>> round(lora_param_count(7e9) / 1e6)
        160
    """
    h, i, layers, kv = _shapes(n_params, shapes)
    per_layer = (2 * (h + h)            # q, o
                 + 2 * (h + int(h * kv))  # k, v
                 + 2 * (h + i)          # gate, up
                 + (i + h))             # down
    return float(r * per_layer * layers)


def estimate_memory(n_params: float, r: int = 64, blocksize: int = 64, lora_bytes: int = 2,
                    optimizer_bytes_per_param: int = 8, world_size: int = 1,
                    seq_len: int = 2048, batch_size: int = 1,
                    checkpointing: bool = True, fsdp: bool = False,
                    shapes=None) -> MemoryEstimate:
    """Per-device memory of QLoRA fine-tuning, the QLoRA paper's accounting.

    Weights in bf16 vs NF4 vs NF4 + double quantization (all parameters counted at the
    4-bit rate, as in the paper); LoRA adapters (r, all linear layers) in ``lora_bytes``
    per parameter with gradients of the same size and AdamW state of
    ``optimizer_bytes_per_param`` (two float32 moments); activations of one checkpointed
    sequence (layer inputs only, bf16). With ``world_size`` > 1 (FSDP) weights, adapters
    and optimizer state are divided across devices; activations are not.

    ``fsdp=True`` counts the FSDP2 layout of ``qlora_kernels.distributed`` exactly: only the
    4-bit codes (4 bits/param) are sharded; the quantization state (absmax, nested scales,
    tables: 0.127 bits/param with double quantization, plus 1088 bytes of tables per
    linear layer) stays replicated on every device;
    adapters, their gradients and AdamW state are sharded; and two decoder layers are
    all-gathered at a time (the one computing, the one prefetched: codes, adapters and
    adapter gradients). ``shapes = (hidden, intermediate, layers, kv_fraction)`` overrides the
    LLaMA shapes looked up from ``n_params`` (scaled to the size away from the LLaMA sizes;
    for other models; ``n_params`` is then the count of quantized parameters). Raises
    ValueError for a non-finite or non-positive ``n_params``, ``r`` < 1 or ``world_size`` < 1.

    Example:
        >>> e = estimate_memory(7e9)
        >>> round(e.weights_bf16_gb), round(e.weights_nf4_dq_gb, 1)
        (14, 3.6)
    """
    check_memory_args(n_params, r, world_size)
    gb = 1e9
    ws = world_size
    bf16 = n_params * 2 / gb
    nf4 = n_params * bits_per_parameter_formula(blocksize, False) / 8 / gb
    nf4_dq = n_params * bits_per_parameter_formula(blocksize, True) / 8 / gb
    shp = _shapes(n_params, shapes)
    lora = lora_param_count(n_params, r, shp)
    lora_w = lora * lora_bytes / gb
    lora_g = lora * lora_bytes / gb
    opt = lora * optimizer_bytes_per_param / gb
    h, _, layers, _ = shp
    per_layer_act = seq_len * batch_size * h * 2
    act = (per_layer_act * layers if checkpointing else per_layer_act * layers * 16) / gb
    sharded = qstate = unsharded = 0.0
    if fsdp:
        sharded = n_params * 0.5 / ws / gb
        # the scales, plus each quantized linear layer's own code tables (16 + 256 float32)
        qstate = nf4_dq - n_params * 0.5 / gb + 7 * layers * (16 + 256) * 4 / gb
        if ws > 1:
            # one layer's codes and adapters (+ adapter grads), twice (compute + prefetch)
            unsharded = 2 * (linear_params_per_layer(shp) * 0.5
                             + 2 * lora / layers * lora_bytes) / gb
        total = sharded + qstate + (lora_w + lora_g + opt) / ws + unsharded + act
    else:
        total = (nf4_dq + lora_w + lora_g + opt) / ws + act
    return MemoryEstimate(n_params=n_params, weights_bf16_gb=bf16, weights_nf4_gb=nf4,
                          weights_nf4_dq_gb=nf4_dq, lora_params=lora, lora_weights_gb=lora_w,
                          lora_grads_gb=lora_g, optimizer_gb=opt, activations_gb=act,
                          total_gb=total, world_size=ws, weights_sharded_gb=sharded,
                          quant_state_gb=qstate, unsharded_layers_gb=unsharded)


# ---------------------------------------------------------------------------- a model's memory
def _unique_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            yield t


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (tied tensors counted once).

    Example:
        >>> import torch
        >>> weight_bytes(torch.nn.Linear(4, 4))
        80
    """
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def parameter_counts(model: nn.Module) -> Dict[str, int]:
    """``{"trainable": n, "total": n}`` counting a 4-bit weight as its logical out x in
    parameters (not its packed bytes).

    Example:
        >>> import torch
        >>> parameter_counts(torch.nn.Linear(4, 4))
        {'trainable': 20, 'total': 20}
    """
    packed = {id(m.weight): m.in_features * m.out_features
              for m in model.modules() if isinstance(m, Linear4bit)}
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = packed.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}
