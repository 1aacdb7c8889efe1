"""Saving and loading 4-bit weights as safetensors files in the bitsandbytes key layout.

A quantized weight ``<name>`` is stored as ``<name>`` (packed uint8), ``<name>.absmax``,
``<name>.quant_map``, ``<name>.nested_absmax``, ``<name>.nested_quant_map`` (when
double-quantized) and ``<name>.quant_state.bitsandbytes__<type>`` (UTF-8 JSON), as in
shared/FORMAT.md, so transformers/bitsandbytes checkpoints load here and ours there.

Example:
    >>> import tempfile, os, torch, qlora_kernels as qk
    >>> packed, state = qk.quantize_4bit(torch.randn(64, 64))
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> qk.save_quantized({"layer.weight": (packed, state)}, path)
    >>> sorted(qk.load_quantized(path))[:2]
    ['layer.weight', 'layer.weight.absmax']
"""
from __future__ import annotations

import os
from typing import Dict, Tuple, Union

import torch
from torch import nn

from .fileio import atomic_write
from .quant_state import STATE_TENSOR_KEYS, QuantState, unpack_tensor_to_dict

_QS_MARK = ".quant_state.bitsandbytes__"


def flatten_quantized(named: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """Expand ``{name: (packed, QuantState)}`` entries into the flat bitsandbytes key layout;
    plain tensors pass through.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> p, s = qk.quantize_4bit(torch.randn(8, 8), double_quant=False)
        >>> sorted(flatten_quantized({"w": (p, s)}))
        ['w', 'w.absmax', 'w.quant_map', 'w.quant_state.bitsandbytes__nf4']
    """
    flat: Dict[str, torch.Tensor] = {}
    for name, value in named.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], QuantState):
            packed, state = value
            state.validate(packed)
            flat[name] = packed
            for key, t in state.as_dict(packed=True).items():
                flat[f"{name}.{key}"] = t
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            raise TypeError(f"{name!r}: expected a tensor or a (packed, QuantState) pair, "
                            f"got {type(value).__name__}")
    return flat


def split_quantized(state_dict: Dict[str, torch.Tensor], device="cpu"
                    ) -> Tuple[Dict[str, Tuple[torch.Tensor, QuantState]], Dict[str, torch.Tensor]]:
    """Split a flat state dict into ``{weight name: (packed, QuantState)}`` and the other
    tensors, checking every entry (sizes, dtypes, and finite values; raises ValueError
    naming the key).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> p, s = qk.quantize_4bit(torch.randn(8, 8))
        >>> quantized, rest = split_quantized(flatten_quantized({"w": (p, s), "b": torch.ones(2)}))
        >>> list(quantized), list(rest)
        (['w'], ['b'])
    """
    quantized: Dict[str, Tuple[torch.Tensor, QuantState]] = {}
    used = set()
    for key in state_dict:
        if _QS_MARK not in key:
            continue
        name = key[: key.index(_QS_MARK)]
        if name in quantized:
            raise ValueError(f"{key!r}: a second quant_state entry for {name!r} (one weight, "
                             "one state)")
        if name not in state_dict:
            raise ValueError(f"{key!r}: the packed weight {name!r} is missing")
        try:
            meta = unpack_tensor_to_dict(state_dict[key])
        except ValueError as exc:
            raise ValueError(f"{key!r}: {exc}") from exc
        parts = {key: state_dict[key]}
        needed = ["absmax", "quant_map"] + (
            ["nested_absmax", "nested_quant_map"] if "nested_offset" in meta else [])
        for suffix in needed:
            k = f"{name}.{suffix}"
            if k not in state_dict:
                raise ValueError(f"{k!r} is missing (required by {key!r})")
            parts[k] = state_dict[k]
        try:  # from_dict checks every key's type, size and values
            state = QuantState.from_dict(parts, device=device)
            state.validate(state_dict[name])
        except ValueError as exc:
            raise ValueError(f"{name!r}: inconsistent quantized entry: {exc}") from exc
        packed = state_dict[name]
        quantized[name] = (packed.to(device), state)
        used.update(parts)
        used.add(name)
    rest = {k: v for k, v in state_dict.items() if k not in used}
    for k, v in rest.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{k!r} holds NaN or Inf values")
    orphans = [k for k in rest if k.rsplit(".", 1)[-1] in STATE_TENSOR_KEYS]
    if orphans:
        raise ValueError(f"{orphans[0]!r} has no quant_state entry beside it "
                         "(a truncated or mixed checkpoint?)")
    return quantized, rest




def save_quantized(module_or_state_dict: Union[nn.Module, Dict[str, object]], path: str) -> None:
    """Write a module's ``state_dict`` (or a dict of tensors and ``(packed, QuantState)``
    pairs) to a safetensors file, atomically: written to a temporary file beside ``path``
    and renamed, so an interrupted save never leaves a half-written file.

    Example:
        >>> import tempfile, os, torch, qlora_kernels as qk
        >>> p, s = qk.quantize_4bit(torch.randn(16, 16))
        >>> qk.save_quantized({"w": (p, s)}, os.path.join(tempfile.mkdtemp(), "q.safetensors"))
    """
    from safetensors.torch import save_file

    sd = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, nn.Module) \
        else module_or_state_dict
    flat = flatten_quantized(sd)
    # safetensors needs contiguous CPU tensors that share no storage
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in flat.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt",
                                                                  "writer": "qlora_kernels"}))


def load_quantized(path: str, device="cpu") -> Dict[str, torch.Tensor]:
    """Load a safetensors file written by ``save_quantized`` (or by bitsandbytes /
    transformers) and check every quantized entry against its JSON state.

    Returns the flat state dict (bitsandbytes layout, ready for ``load_state_dict``); use
    ``split_quantized`` for ``(packed, QuantState)`` pairs. Raises ValueError naming the
    file and key on a truncated file, a missing or duplicated key, or an entry of the wrong
    type, size or dtype or with NaN, Inf or negative scales (``QuantState.from_dict``
    checks); RuntimeError for ``device="cuda"`` without CUDA.

    Example:
        >>> import tempfile, os, torch, qlora_kernels as qk
        >>> p, s = qk.quantize_4bit(torch.randn(16, 16))
        >>> f = os.path.join(tempfile.mkdtemp(), "q.safetensors")
        >>> qk.save_quantized({"w": (p, s)}, f)
        >>> torch.equal(qk.load_quantized(f)["w"], p)
        True
    """
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"load_quantized({path!r}, device={str(device)!r}): CUDA is not "
                           "available on this machine (torch.cuda.is_available() is False)")
    try:
        sd = load_file(path, device="cpu")  # checked on the CPU, then moved
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                         f"{exc}") from exc
    try:
        split_quantized(sd)  # validation only
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return {k: v.to(device) for k, v in sd.items()} if device.type != "cpu" else sd
