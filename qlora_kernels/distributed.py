"""QLoRA beyond one GPU: helpers for FSDP2 (``fully_shard``) and DDP.

Layout under FSDP2 (see docs/fsdp.md):

* The packed 4-bit weight of every ``Linear4bit`` is an ``nn.Parameter`` of shape
  ``(nbytes, 1)`` (``requires_grad=False``), so ``fully_shard`` shards it along dim 0 like
  any parameter (padding uneven shards) and all-gathers it before the layer's forward.
  Being frozen, it takes no gradient, no reduce-scatter and no optimizer state.
* The quantization state (``absmax``, ``nested_absmax``, ``quant_map``,
  ``nested_quant_map``, ``offset``) are buffers: FSDP leaves buffers alone, so they stay
  REPLICATED on every rank (0.127 bits/param with double quantization, 3 % of the codes).
* LoRA adapters are ordinary parameters: sharded, all-gathered, gradients reduce-scattered.
* ``quant_storage`` (``set_quant_storage``) stores the same bytes as bfloat16/float16/float32
  so that one parameter group has one dtype (FSDP1 flat parameters need it; FSDP2 otherwise
  all-gathers a mixed-dtype group through a uint8 buffer) and so that
  ``MixedPrecisionPolicy(param_dtype=...)`` leaves the bytes alone: it must equal
  ``param_dtype`` (uint8, a non-float, is never cast either).

Saving: ``full_state_dict`` gathers one tensor at a time onto rank 0 (CPU) in the
bitsandbytes key layout (packed weights as uint8 whatever ``quant_storage`` is);
``save_full_state_dict`` writes it atomically as safetensors; ``save_adapter_rank0`` writes
the adapters once, in PEFT's layout. All ranks must call them (they are collectives).

Example (one process, no process group needed):
    >>> import torch, qlora_kernels as qk
    >>> from qlora_kernels import distributed as qd
    >>> m = torch.nn.Sequential(qk.Linear4bit(64, 32))
    >>> _ = qd.set_quant_storage(m, torch.bfloat16)
    >>> sd = qd.full_state_dict(m); sd["0.weight"].dtype, tuple(sd["0.weight"].shape)
    (torch.uint8, (1024, 1))
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .nn import Linear4bit
from .quant_state import STATE_TENSOR_KEYS
from .packed_storage import is_dtensor as _is_dtensor, storage_to_packed

__all__ = ["set_quant_storage", "shard_model", "full_state_dict", "save_full_state_dict",
           "save_adapter_rank0", "local_shard_bytes", "rank", "world_size"]


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def set_quant_storage(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every ``Linear4bit``'s packed weight as ``dtype`` (call before ``fully_shard``).

    Pick the dtype of the other parameters of a shard group (e.g. ``torch.bfloat16`` for a
    bf16 model), and with ``MixedPrecisionPolicy(param_dtype=P)`` either uint8 or ``P``.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> m = set_quant_storage(torch.nn.Sequential(qk.Linear4bit(64, 32)), torch.float32)
        >>> m[0].weight.dtype
        torch.float32
    """
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.set_quant_storage(dtype)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a transformers causal LM (``model.model.layers``,
    ``transformer.h``, ...). Raises ValueError when none is found.

    Example:
        >>> import torch
        >>> m = torch.nn.Module(); m.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        >>> len(decoder_layers(m))
        1
    """
    for path in ("model.layers", "layers", "model.decoder.layers", "transformer.h",
                 "base_model.model.model.layers"):
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError("no decoder layer list found (model.layers, transformer.h, ...); "
                     "pass layers= explicitly")


def fsdp_shards_integer_params() -> bool:
    """Whether this torch's ``fully_shard`` can shard a frozen integer parameter (the uint8
    packed weights). torch 2.11's makes every sharded parameter require gradients, which an
    integer tensor cannot; 2.12 keeps ``requires_grad``.

    Example:
        >>> fsdp_shards_integer_params() in (True, False)
        True
    """
    # torch.torch_version.TorchVersion compares with tuples, local tags (+cu130) ignored
    return torch.__version__ >= (2, 12)


def check_fsdp_storage(model: nn.Module) -> None:
    """Raise ValueError, before anything is sharded, when ``fully_shard`` of this torch
    cannot shard the model's packed weights in their storage dtype.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> check_fsdp_storage(set_quant_storage(torch.nn.Sequential(qk.Linear4bit(64, 32)),
        ...                                      torch.bfloat16))
    """
    if fsdp_shards_integer_params():
        return
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise ValueError(
                f"torch {torch.__version__}'s fully_shard cannot shard the {p.dtype} parameter "
                f"{name!r} (it makes every sharded parameter require gradients; torch 2.12 "
                "fixed it): store the packed weights as floats first, "
                "qk.distributed.set_quant_storage(model, torch.bfloat16) (the MixedPrecision"
                "Policy's param_dtype, if any), or use torch >= 2.12")


def shard_model(model: nn.Module, layers: Optional[Iterable[nn.Module]] = None,
                **fully_shard_kwargs) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (the issue's recipe), with the same
    keyword arguments (``mesh``, ``mp_policy``, ``reshard_after_forward`` ...). Needs an
    initialized process group.

    Example (under torchrun):
        >>> qk.prepare_model(model, r=64, lora_alpha=16)            # doctest: +SKIP
        >>> shard_model(model, mp_policy=MixedPrecisionPolicy(torch.bfloat16))  # doctest: +SKIP
    """
    from torch.distributed.fsdp import fully_shard

    check_fsdp_storage(model)
    for block in (decoder_layers(model) if layers is None else layers):
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def _packed_weight_keys(model: nn.Module) -> Dict[str, int]:
    """``{state-dict key of a Linear4bit packed weight: its byte count}``."""
    return {(f"{name}." if name else "") + "weight": m.packed_nbytes
            for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def full_state_dict(model: nn.Module, rank0_only: bool = True, cpu: bool = True
                    ) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2/DDP/plain model in the bitsandbytes key
    layout; every rank must call it. Sharded tensors are all-gathered ONE AT A TIME and
    (``cpu=True``) moved to the CPU, so no rank holds more than one unsharded tensor on the
    device. With ``rank0_only`` the other ranks get ``{}``. Packed 4-bit weights come out
    uint8 ``(nbytes, 1)`` whatever their ``quant_storage``. DDP's ``module.`` prefix is kept
    (pass ``ddp_model.module`` to drop it).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> sorted(full_state_dict(torch.nn.Sequential(qk.Linear4bit(8, 4))))[:2]
        ['0.bias', '0.weight']
    """
    packed_keys = _packed_weight_keys(model)
    keep = not rank0_only or rank() == 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        full = value.full_tensor() if _is_dtensor(value) else value  # a collective
        if not keep:
            del full
            continue
        full = full.detach()
        if key in packed_keys and full.dtype != torch.uint8:
            full = storage_to_packed(full, packed_keys[key])
        out[key] = full.to("cpu") if cpu else full
    return out


def save_full_state_dict(model: nn.Module, path: str) -> None:
    """Gather the full state dict on rank 0 and write it there as one safetensors file
    (atomic: a temporary file renamed into place), in the bitsandbytes layout; all ranks
    call it and return after the file exists. Reload in one process with
    ``model.load_state_dict(qk.load_quantized(path))``.

    Example:
        >>> import os, tempfile, torch, qlora_kernels as qk
        >>> f = os.path.join(tempfile.mkdtemp(), "full.safetensors")
        >>> save_full_state_dict(torch.nn.Sequential(qk.Linear4bit(8, 4)), f); os.path.exists(f)
        True
    """
    from .serialization import save_quantized

    sd = full_state_dict(model, rank0_only=True, cpu=True)
    if rank() == 0:
        save_quantized(sd, path)
    _barrier()


@contextlib.contextmanager
def _swapped_parameters(swaps):
    """Temporarily register other tensors as parameters: ``[(module, name, tensor)]``."""
    saved = [(m, n, m._parameters[n]) for m, n, _ in swaps]
    try:
        for m, n, t in swaps:
            m._parameters[n] = nn.Parameter(t, requires_grad=False)
        yield
    finally:
        for m, n, p in saved:
            m._parameters[n] = p


def save_adapter_rank0(model: nn.Module, path: str, **save_adapter_kwargs) -> None:
    """Write the LoRA adapters of a sharded (FSDP2) or replicated (DDP) model ONCE, from
    rank 0, in PEFT's layout (``qlora_kernels.save_adapter``); every rank must call it (the
    adapter shards are all-gathered). Pass the DDP-wrapped model's ``.module``.

    Example:
        >>> import os, tempfile, torch, qlora_kernels as qk
        >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, verbose=False)
        >>> d = tempfile.mkdtemp(); save_adapter_rank0(m, d); sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    from .adapters import save_adapter
    from .prepare import lora_layers

    swaps = []
    for _, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            lin = getattr(layer, part)
            w = lin.weight
            full = w.full_tensor() if _is_dtensor(w) else w  # a collective
            if rank() == 0:
                swaps.append((lin, "weight", full.detach()))
    if rank() == 0:
        with _swapped_parameters(swaps):
            save_adapter(model, path, **save_adapter_kwargs)
    _barrier()


def local_shard_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes this rank holds, by kind: ``packed_4bit`` (its shard of the packed codes) vs
    ``packed_4bit_total`` (all of them), ``quant_state`` (replicated absmax, nested scales,
    tables), ``adapters`` (its shard of lora_A/lora_B), ``other_params`` (its shard of the
    rest: embeddings, norms, head) and ``buffers`` (other buffers, e.g. rotary tables).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> local_shard_bytes(torch.nn.Sequential(qk.Linear4bit(64, 32)))["packed_4bit"]
        1024
    """
    out = dict(packed_4bit=0, packed_4bit_total=0, quant_state=0, adapters=0,
               other_params=0, buffers=0)
    counted = set()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            w = _local(m.weight)
            out["packed_4bit"] += w.numel() * w.element_size()
            out["packed_4bit_total"] += m.packed_nbytes
            counted.add(id(m.weight))
            for name in STATE_TENSOR_KEYS:
                t = getattr(m, name)
                if t is not None:
                    out["quant_state"] += t.numel() * t.element_size()
                    counted.add(id(t))
    for name, p in model.named_parameters():
        if id(p) in counted:
            continue
        t = _local(p)
        kind = "adapters" if (".lora_A." in f".{name}" or ".lora_B." in f".{name}") else "other_params"
        out[kind] += t.numel() * t.element_size()
    for b in model.buffers():
        if id(b) not in counted:
            out["buffers"] += b.numel() * b.element_size()
    return out
