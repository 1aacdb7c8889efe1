"""Checkpoints in the layout transformers + bitsandbytes write for a 4-bit model.

Reading: ``config.json`` carries ``quantization_config`` with ``quant_method:
"bitsandbytes"``; each quantized Linear holds the keys of shared/FORMAT.md
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
``weight.quant_state.bitsandbytes__<type>``). Writing (``save_pretrained``): the same
layout, sharded, with ``model.safetensors.index.json``, atomically.

Example:
    >>> bnb_quantization_config("nf4", True, "bfloat16", skip=["lm_head"])["quant_method"]
    'bitsandbytes'
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..fileio import make_temp_dir, save_safetensors
from ..nn import Linear4bit
from ..nn.linear4bit import storage_to_packed
from ..quant_state import QuantState, unpack_tensor_to_dict
from ..serialization import _QS_MARK
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError

BNB_QUANT_TYPES = ("nf4", "fp4")
_8BIT_KEYS = (".SCB", ".weight_format")


def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: str,
                            skip: List[str]) -> dict:
    """The ``quantization_config`` transformers reads for a 4-bit bitsandbytes model.
    ``skip``: the linear layers left dense (transformers must not replace them).

    Example:
        >>> bnb_quantization_config("fp4", False, "float32", [])["bnb_4bit_quant_type"]
        'fp4'
    """
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": bool(double_quant),
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": list(skip), "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def check_bnb_config(qc, config_path: str) -> Optional[dict]:
    """None for a checkpoint without ``quantization_config``; for a 4-bit bitsandbytes one
    its settings; anything else raises ``CheckpointError`` naming the file and key.

    Example:
        >>> check_bnb_config({"quant_method": "bitsandbytes", "load_in_4bit": True,
        ...                   "bnb_4bit_quant_type": "nf4"}, "config.json")["quant_type"]
        'nf4'
    """
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(f"{config_path}: quantization_config.quant_method={method!r} is "
                              f"not supported (only 4-bit bitsandbytes checkpoints load)")
    if qc.get("load_in_8bit") or not qc.get("load_in_4bit", False):
        raise CheckpointError(f"{config_path}: quantization_config.load_in_8bit: 8-bit "
                              f"(LLM.int8) bitsandbytes weights are not supported; only 4-bit")
    qt = qc.get("bnb_4bit_quant_type", "fp4")
    if qt not in BNB_QUANT_TYPES:
        raise CheckpointError(f"{config_path}: quantization_config.bnb_4bit_quant_type={qt!r} "
                              f"is not supported (one of {BNB_QUANT_TYPES})")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if not hasattr(torch, str(storage)) or not isinstance(getattr(torch, storage), torch.dtype):
        raise CheckpointError(f"{config_path}: quantization_config.bnb_4bit_quant_storage="
                              f"{storage!r} is not a torch dtype")
    return {"quant_type": qt, "compute_dtype": qc.get("bnb_4bit_compute_dtype")}


def quantized_weights(ckpt: Checkpoint) -> Dict[str, str]:
    """``{weight key: quant_state key}`` of every 4-bit weight of a checkpoint, checking its
    quant type and that its parts are present (``CheckpointError`` names file and key).

    Example:
        >>> quantized_weights(Checkpoint("d", []))
        {}
    """
    out = {}
    for key in ckpt.keys():
        if key.endswith(_8BIT_KEYS):
            raise CheckpointError(f"{ckpt.location[key]}: {key!r} is an 8-bit (LLM.int8) "
                                  f"bitsandbytes weight; only 4-bit weights are supported")
        if _QS_MARK not in key:
            continue
        weight = key[: key.index(_QS_MARK)]
        qt = key[key.index(_QS_MARK) + len(_QS_MARK):]
        if qt not in BNB_QUANT_TYPES:
            raise CheckpointError(f"{ckpt.location[key]}: {key!r}: quant type {qt!r} is not "
                                  f"supported (one of {BNB_QUANT_TYPES})")
        for part in [weight, weight + ".absmax", weight + ".quant_map"]:
            if part not in ckpt.location:
                raise CheckpointError(f"{ckpt.location[key]}: {part!r} is missing (needed "
                                      f"by {key!r})")
        out[weight] = key
    return out


def read_quantized_weight(ckpt: Checkpoint, weight: str, qs_key: str, device="cpu"
                          ) -> Tuple[torch.Tensor, QuantState]:
    """Read one 4-bit weight's packed codes and state; a malformed entry raises
    ``CheckpointError`` naming the file and key.

    Example:
        >>> import os, tempfile, torch, qlora_kernels as qk
        >>> from qlora_kernels.loading.checkpoint import open_checkpoint
        >>> d = tempfile.mkdtemp(); p, s = qk.quantize_4bit(torch.randn(8, 8))
        >>> qk.save_quantized({"w": (p, s)}, os.path.join(d, "model.safetensors"))
        >>> ck = open_checkpoint(d)
        >>> read_quantized_weight(ck, "w", "w.quant_state.bitsandbytes__nf4")[1].shape
        torch.Size([8, 8])
    """
    path = ckpt.location[qs_key]
    parts = {k: ckpt.read(k) for k in ckpt.keys() if k.startswith(weight + ".")}
    try:
        meta = unpack_tensor_to_dict(parts[qs_key])
        nested = "nested_offset" in meta
        for suffix in ("nested_absmax", "nested_quant_map") if nested else ():
            if f"{weight}.{suffix}" not in parts:
                raise ValueError(f"{weight}.{suffix} is missing")
        state = QuantState.from_dict(parts, device=device)
        packed = ckpt.read(weight)
        if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8
            packed = storage_to_packed(packed, (state.numel + 1) // 2)
        packed = packed.to(device)
        state.validate(packed)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {qs_key!r}: inconsistent 4-bit weight: {exc}") from exc
    return packed, state


# ---------------------------------------------------------------------------- writing
def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(s)


def _bnb_layers(model: nn.Module):
    from ..lora import QLoRALinear

    if any(isinstance(m, QLoRALinear) for m in model.modules()):
        raise ValueError("save_pretrained writes the 4-bit base model: the model holds "
                         "QLoRALinear adapters; save them with qk.save_adapter, or fold them "
                         "in with qk.merge_lora(model, requantize=True)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError(f"save_pretrained: {type(model).__name__} has no Linear4bit layer")
    kinds = {(m.quant_type, m.double_quant) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"save_pretrained: the Linear4bit layers mix settings {sorted(kinds)}; "
                         "a bitsandbytes config holds one quant type and one double-quant flag")
    qt, dq = kinds.pop()
    if qt not in BNB_QUANT_TYPES:
        raise ValueError(f"save_pretrained: quant_type {qt!r} has no bitsandbytes equivalent "
                         f"(one of {BNB_QUANT_TYPES})")
    return layers, qt, dq


def _state_dict_untied(model: nn.Module) -> Dict[str, torch.Tensor]:
    # Tied parameters (e.g. lm_head and the embedding) are written once, under the first
    # name, as transformers does; safetensors refuses tensors that share memory.
    first = {}
    dropped = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            dropped.add(name)
        else:
            first[id(p)] = name
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if k not in dropped}


def _shards(sd: Dict[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    # the keys of one quantized weight stay in one shard
    groups: Dict[str, List[str]] = {}
    for key in sd:  # "<module>.weight.absmax" etc. go with "<module>.weight"
        owner = key[: key.index(".weight.") + len(".weight")] if ".weight." in key else key
        groups.setdefault(owner, []).append(key)
    shards, cur, size = [], {}, 0
    for owner, keys in groups.items():
        nbytes = sum(sd[k].numel() * sd[k].element_size() for k in keys)
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        for k in keys:
            cur[k] = sd[k]
        size += nbytes
    if cur or not shards:
        shards.append(cur)
    return shards


def save_pretrained(model: nn.Module, out_dir: str, max_shard_size="5GB", tokenizer=None) -> None:
    """Write a model whose linear layers are ``Linear4bit`` as transformers + bitsandbytes
    do: ``config.json`` with its ``quantization_config``, safetensors shards of at most
    ``max_shard_size`` ("5GB", "500MB" or bytes) with ``model.safetensors.index.json`` when
    there are several, and the tokenizer's files when ``tokenizer`` is given. The directory
    is built beside ``out_dir`` and renamed into place, so an interrupted save leaves the
    old contents (or nothing), never a half-written checkpoint.

    Refuses (ValueError) models with QLoRALinear adapters, mixed quant settings or INT4.
    The nested 8-bit code (FP8 or dynamic) is stored with each weight and bitsandbytes
    decodes with the stored table.

    Example:
        >>> import os, tempfile, torch, qlora_kernels as qk  # doctest: +SKIP
        >>> model = qk.from_pretrained("llama-dir")  # doctest: +SKIP
        >>> qk.save_pretrained(model, os.path.join(tempfile.mkdtemp(), "out"))  # doctest: +SKIP
    """
    import copy

    layers, qt, dq = _bnb_layers(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"save_pretrained needs a transformers model (with .config), got "
                        f"{type(model).__name__}")
    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    cdt = next(iter(layers.values())).compute_dtype or getattr(config, "dtype", None) or torch.float32
    config = copy.deepcopy(config)
    config.quantization_config = bnb_quantization_config(qt, dq, str(cdt).replace("torch.", ""),
                                                         skip)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in _state_dict_untied(model).items()}
    shards = _shards(sd, _parse_size(max_shard_size))

    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, f".{os.path.basename(out_dir)}.tmp-")
    try:
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(tmp)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = SINGLE_FILE if len(shards) == 1 else \
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = name
                total += v.numel() * v.element_size()
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

