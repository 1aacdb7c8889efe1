"""Memory accounting: real bits per parameter of a packed tensor, the QLoRA memory
estimator behind ``qlora-kernels memory``, and the CPU block cache (large CPU blocks kept
for reuse between training steps).

Example:
    >>> import qlora_kernels as qk
    >>> round(qk.estimate_memory(65e9).weights_nf4_dq_gb, 1)
    33.5
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Optional

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
    # Model-specific terms (``vocab_size`` or ``config`` given; zero otherwise): the input
    # embedding and the (untied) LM head kept in the compute dtype, the LM head's logits,
    # softmax and gradient during the loss, and the transients of the backward (one
    # decoder layer recomputed from its checkpoint, one weight dequantized to compute dtype).
    embeddings_gb: float = 0.0
    loss_gb: float = 0.0
    transient_gb: float = 0.0
    # Selective checkpointing (``selective_checkpointing=True``; zero otherwise): each 4-bit
    # layer's output and each block's attention output, kept from the forward to the backward.
    kept_outputs_gb: float = 0.0

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


def kept_outputs_per_token(shapes) -> int:
    """Values per token that selective checkpointing (``qlora_kernels.checkpointing``) keeps
    for the backward in one LLaMA decoder layer: the outputs of its seven linear layers and
    of its attention, from ``shapes = (hidden, intermediate, layers, kv_fraction)``.

    Example:
        >>> kept_outputs_per_token((576, 1536, 30, 1 / 3))  # SmolLM2-135M
        5760
    """
    h, i, _, kv = shapes
    return 4 * h + 2 * int(h * kv) + 2 * i


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


def _config_shapes(config):
    """(n_params, shapes, vocab_size, tied) of a transformers LLaMA-style config: the
    linear layers, embedding, head (unless tied) and RMSNorm weights counted from it."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    shapes = (h, config.intermediate_size, config.num_hidden_layers, kv_heads / heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    vocab = config.vocab_size
    n = (linear_params_per_layer(shapes) * shapes[2] + vocab * h * (1 if tied else 2)
         + (2 * shapes[2] + 1) * h)
    return float(n), shapes, vocab, tied


def estimate_memory(n_params: Optional[float] = None, r: int = 64, blocksize: int = 64,
                    lora_bytes: int = 2, optimizer_bytes_per_param: int = 8, world_size: int = 1,
                    seq_len: int = 2048, batch_size: int = 1,
                    checkpointing: bool = True, fsdp: bool = False,
                    shapes=None, *, vocab_size: Optional[int] = None,
                    tied_embeddings: bool = False, compute_bytes: int = 2,
                    chunked_loss: bool = True, config=None,
                    selective_checkpointing: bool = False) -> MemoryEstimate:
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

    A model as ``from_pretrained`` / ``prepare_model`` lay it out (PEFT's ``all-linear``:
    the embedding and the LM head are not quantized): give ``vocab_size`` (with
    ``tied_embeddings`` when the head shares the embedding; ``n_params`` then counts every
    parameter, embedding and head included), or a transformers ``config``
    (LLaMA-style fields: it gives ``n_params``, ``shapes``, ``vocab_size`` and the tying).
    Then the embedding and head are counted at ``compute_bytes`` per parameter (2: bf16)
    instead of 4 bits, the rest at the 4-bit rate; ``loss_gb`` is the LM head's logits
    during the loss: with ``chunked_loss`` (``prepare_model``'s default) one chunk of
    ``qlora_kernels.chunked_loss.CHUNK_ELEMENTS // vocab_size`` tokens at a time, each
    logit held in the compute dtype and float32 plus its compute-dtype gradient; without
    it the whole batch's logits as transformers' loss holds them (compute-dtype logits,
    their float32 copy, log-softmax and gradient, the compute-dtype gradient); and
    ``transient_gb`` the backward's working set: one decoder layer's activations
    recomputed from its checkpoint (16 hidden-sized values per token) and the largest
    weight dequantized to the compute dtype. ``selective_checkpointing`` (``prepare_model``'s
    default on the CPU) adds ``kept_outputs_gb``: every 4-bit layer's and attention's output,
    kept in the compute dtype for the backward (``kept_outputs_per_token`` per layer).

    Example:
        >>> e = estimate_memory(7e9)
        >>> round(e.weights_bf16_gb), round(e.weights_nf4_dq_gb, 1)
        (14, 3.6)
        >>> from types import SimpleNamespace  # or a transformers LlamaConfig
        >>> tinyllama = SimpleNamespace(hidden_size=2048, intermediate_size=5632,
        ...     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        ...     vocab_size=32000, tie_word_embeddings=False)
        >>> e = estimate_memory(config=tinyllama, r=64, seq_len=512)
        >>> round(e.total_gb, 2), round(e.embeddings_gb, 3), round(e.loss_gb, 3)
        (1.54, 0.262, 0.067)
        >>> e2 = estimate_memory(config=tinyllama, r=64, seq_len=512, selective_checkpointing=True)
        >>> round(e2.kept_outputs_gb, 3), round(e2.total_gb - e.total_gb, 3)
        (0.45, 0.45)
    """
    if config is not None:
        n_cfg, shapes, vocab_size, tied_embeddings = _config_shapes(config)
        n_params = n_cfg if n_params is None else n_params
    check_memory_args(n_params, r, world_size)
    gb = 1e9
    ws = world_size
    shp = _shapes(n_params, shapes)
    h, inter, layers, _ = shp
    kept = 0.0  # embedding and head parameters, kept in the compute dtype
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        kept = float(vocab_size * h * (1 if tied_embeddings else 2))
        if kept >= n_params:
            raise ValueError(f"params ({n_params:g}) must exceed the embedding and head's "
                             f"{kept:g} parameters (vocab_size {vocab_size} x hidden {h})")
    quantized = n_params - kept
    bf16 = n_params * 2 / gb
    nf4 = quantized * bits_per_parameter_formula(blocksize, False) / 8 / gb
    nf4_dq = quantized * bits_per_parameter_formula(blocksize, True) / 8 / gb
    lora = lora_param_count(n_params, r, shp)
    lora_w = lora * lora_bytes / gb
    lora_g = lora * lora_bytes / gb
    opt = lora * optimizer_bytes_per_param / gb
    tokens = seq_len * batch_size
    per_layer_act = tokens * h * 2
    act = (per_layer_act * layers if checkpointing else per_layer_act * layers * 16) / gb
    embeddings = loss = transient = 0.0
    if vocab_size is not None:
        embeddings = kept * compute_bytes / gb
        if chunked_loss:
            from .chunked_loss import CHUNK_ELEMENTS
            loss = min(tokens, max(1, CHUNK_ELEMENTS // vocab_size)) * vocab_size \
                * (2 * compute_bytes + 4) / gb
        else:
            loss = tokens * vocab_size * (2 * compute_bytes + 3 * 4) / gb
        recompute = tokens * h * 16 * compute_bytes if checkpointing else 0
        transient = (recompute + max(h, inter) * h * compute_bytes) / gb
    kept_outputs = 0.0
    if checkpointing and selective_checkpointing:
        kept_outputs = tokens * layers * kept_outputs_per_token(shp) * compute_bytes / gb
    extra = embeddings + loss + transient + kept_outputs
    sharded = qstate = unsharded = 0.0
    if fsdp:
        sharded = quantized * 0.5 / ws / gb
        # the scales, plus each quantized linear layer's own code tables (16 + 256 float32)
        qstate = nf4_dq - quantized * 0.5 / gb + 7 * layers * (16 + 256) * 4 / gb
        if ws > 1:
            # one layer's codes and adapters (+ adapter grads), twice (compute + prefetch)
            unsharded = 2 * (linear_params_per_layer(shp) * 0.5
                             + 2 * lora / layers * lora_bytes) / gb
        total = sharded + qstate + (lora_w + lora_g + opt) / ws + unsharded + act + extra
    else:
        total = (nf4_dq + lora_w + lora_g + opt) / ws + act + extra
    return MemoryEstimate(n_params=n_params, weights_bf16_gb=bf16, weights_nf4_gb=nf4,
                          weights_nf4_dq_gb=nf4_dq, lora_params=lora, lora_weights_gb=lora_w,
                          lora_grads_gb=lora_g, optimizer_gb=opt, activations_gb=act,
                          total_gb=total, world_size=ws, weights_sharded_gb=sharded,
                          quant_state_gb=qstate, unsharded_layers_gb=unsharded,
                          embeddings_gb=embeddings, loss_gb=loss, transient_gb=transient,
                          kept_outputs_gb=kept_outputs)


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


_BLOCK_CACHE_STATS = ("enabled", "in_use_bytes", "cached_bytes", "peak_in_use_bytes", "hits",
                      "misses")


def cpu_block_cache(enable: bool = True) -> None:
    """Turn the CPU block cache on or off for the whole process.

    On, torch's CPU allocator serves every allocation of 1 MiB or more from blocks it maps
    itself and keeps, when freed, for the next allocation of the same size class (sizes
    rounded up by at most 1/16); smaller ones, and everything while off, go to the previous
    allocator. Everything it maps, in use or cached, stays within the most it ever had in
    use at once: a new size first unmaps cached blocks of other sizes. A training step's
    activations then no longer fragment the C heap (csrc/cpu/block_cache_cpu.cpp;
    benchmarks/README.md has the measured peak RSS). Off unmaps the cached blocks; blocks
    still in use stay valid and are unmapped when freed. ``prepare_model`` turns it on for
    a model on the CPU (its ``cpu_block_cache`` argument).

    Example:
        >>> import torch
        >>> cpu_block_cache(True); t = torch.ones(1 << 19)  # 2 MiB: from the cache
        >>> stats = cpu_block_cache_stats(); stats["enabled"], stats["in_use_bytes"] >= 1 << 21
        (True, True)
        >>> del t; cpu_block_cache(False); cpu_block_cache_stats()["cached_bytes"]
        0
    """
    torch.ops.qlora_kernels.cpu_block_cache_enable(bool(enable))


def cpu_block_cache_stats() -> Dict[str, int]:
    """The CPU block cache's state: whether it is on, bytes in use and cached, the most
    bytes in use at once, and its hits and misses (see ``cpu_block_cache``).

    Example:
        >>> sorted(cpu_block_cache_stats())[:2]
        ['cached_bytes', 'enabled']
    """
    values = torch.ops.qlora_kernels.cpu_block_cache_stats()
    out = dict(zip(_BLOCK_CACHE_STATS, values))
    out["enabled"] = bool(out["enabled"])
    return out

