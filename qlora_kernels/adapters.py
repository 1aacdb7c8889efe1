"""Saving and loading LoRA adapters in PEFT's file layout.

A directory with ``adapter_config.json`` (PEFT ``LoraConfig`` fields) and
``adapter_model.safetensors`` holding, for each adapted layer at module path ``<p>``,
``base_model.model.<p>.lora_A.weight`` (r x in) and ``base_model.model.<p>.lora_B.weight``
(out x r): a PEFT user loads it with ``PeftModel.from_pretrained(base, dir)`` and an
adapter saved by PEFT loads here. Layers whose rank or alpha differ from the most common
one go to PEFT's ``rank_pattern`` / ``alpha_pattern``.

Example:
    >>> import tempfile, torch, qlora_kernels as qk
    >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), r=2, verbose=False)
    >>> d = tempfile.mkdtemp()
    >>> qk.save_adapter(m, d); _ = qk.load_adapter(m, d)
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Optional

import torch
from torch import nn

from .lora import QLoRALinear
from .prepare import lora_layers, linear_names, match_module_name, prepare_model
from .fileio import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_TASK_SUFFIXES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                  ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                  ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))


def _dropout_p(m: QLoRALinear) -> float:
    return float(m.lora_dropout.p) if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def _target_modules(model: nn.Module, adapted) -> object:
    """The shortest PEFT ``target_modules`` that selects exactly the adapted layers: the
    set of their last name components when that selects nothing else, else an anchored
    regex of the full names."""
    adapted = set(adapted)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    if {n for n in linear_names(model) if match_module_name(n, suffixes)} == adapted:
        return suffixes
    return "(" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"


def _pattern_value(pattern: Dict[str, float], name: str, default):
    # PEFT's rule: a pattern key matches the module name or a "."-separated suffix of it.
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _guess_task_type(model: nn.Module) -> Optional[str]:
    cls = type(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if cls.endswith(suffix):
            return task
    return None


def adapter_config(model: nn.Module, base_model_name_or_path: Optional[str] = None,
                   task_type: Optional[str] = "auto") -> dict:
    """The PEFT ``adapter_config.json`` content describing ``model``'s adapters.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, verbose=False)
        >>> adapter_config(m)["r"], adapter_config(m)["target_modules"]
        (2, ['0'])
    """
    layers = lora_layers(model)
    if not layers or "" in layers:
        raise ValueError(f"{type(model).__name__} has no QLoRALinear sub-layer to save "
                         "(run prepare_model first)")
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("layers disagree on use_rslora; PEFT's config has one flag")
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    dropout = Counter(_dropout_p(m) for m in layers.values()).most_common(1)[0][0]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None) or None
    alpha_value = int(alpha) if float(alpha).is_integer() else alpha
    return {
        "peft_type": "LORA",
        "task_type": _guess_task_type(model) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha_value,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, layers),
        "bias": "none",
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
    }


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None,
                 task_type: Optional[str] = "auto") -> None:
    """Write ``model``'s LoRA adapters to the directory ``path`` in PEFT's layout.

    Each file is written to a temporary file in ``path`` and renamed over the old one
    (weights first, config second), so an interrupted save leaves the previous adapter
    readable. Tensors are stored in the adapters' dtype. ``task_type="auto"`` derives
    PEFT's task type from a transformers class name (``...ForCausalLM`` -> ``CAUSAL_LM``).

    Example:
        >>> import os, tempfile, torch, qlora_kernels as qk
        >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, verbose=False)
        >>> d = tempfile.mkdtemp(); qk.save_adapter(m, d); sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    from safetensors.torch import save_file

    config = adapter_config(model, base_model_name_or_path, task_type)
    tensors = {}
    for name, m in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight
            tensors[f"{PREFIX}{name}.{part}.weight"] = w.detach().to("cpu").contiguous().clone()
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, WEIGHTS_NAME),
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(os.path.join(path, CONFIG_NAME), write_json)


def read_adapter_config(path: str) -> dict:
    """Read and check ``adapter_config.json`` of an adapter directory (ValueError if it is
    not a plain LoRA adapter this library can apply).

    Example:
        >>> import tempfile, torch, qlora_kernels as qk
        >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, verbose=False)
        >>> d = tempfile.mkdtemp(); qk.save_adapter(m, d); read_adapter_config(d)["peft_type"]
        'LORA'
    """
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON: {exc}") from exc
    for key in ("peft_type", "r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{file}: missing field {key!r}")
    if cfg["peft_type"] != "LORA":
        raise ValueError(f"{file}: peft_type {cfg['peft_type']!r} is not 'LORA'")
    unsupported = {"fan_in_fan_out": False, "use_dora": False, "bias": "none"}
    for key, ok in unsupported.items():
        if cfg.get(key, ok) not in (ok, None):
            raise ValueError(f"{file}: {key}={cfg[key]!r} is not supported (need {ok!r})")
    return cfg


def _resize(m: QLoRALinear, r: int) -> None:
    dtype, device = m.lora_A.weight.dtype, m.lora_A.weight.device
    m.r = r
    m.lora_A = nn.Linear(m.in_features, r, bias=False, device=device, dtype=dtype)
    m.lora_B = nn.Linear(r, m.out_features, bias=False, device=device, dtype=dtype)
    m.reset_lora_parameters()
    m.set_scale(m.lora_alpha)


def load_adapter(model: nn.Module, path: str, strict: bool = True, **prepare_kwargs) -> nn.Module:
    """Load a PEFT-layout LoRA adapter (ours or PEFT's) into ``model`` and return it.

    ``model`` is normally the output of ``prepare_model``. A model without any
    ``QLoRALinear`` is first converted with ``prepare_model`` using the adapter's
    ``target_modules``, ``r``, ``lora_alpha``, ``lora_dropout`` and ``use_rslora`` (plus
    ``prepare_kwargs``, e.g. ``quant_type``). Each layer's scaling is set from the config
    (``alpha_pattern`` included). Everything is checked before anything is written: a key
    naming no adapted layer, a wrong shape, or (with ``strict``) an adapted layer missing
    from the file raises ValueError naming the key, and leaves the model unchanged.

    Example:
        >>> import tempfile, torch, qlora_kernels as qk
        >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, verbose=False)
        >>> d = tempfile.mkdtemp(); qk.save_adapter(m, d)
        >>> qk.load_adapter(m, d) is m
        True
    """
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    wfile = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(wfile):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:
        tensors = load_file(wfile)
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise ValueError(f"{wfile}: not a readable safetensors file: {exc}") from exc
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if not lora_layers(model):
        prepare_kwargs.setdefault("verbose", False)
        prepare_model(model, target_modules=cfg.get("target_modules") or "all-linear",
                      r=int(cfg["r"]), lora_alpha=cfg["lora_alpha"],
                      lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                      use_rslora=bool(cfg.get("use_rslora", False)), **prepare_kwargs)
        for name, m in lora_layers(model).items():
            r = int(_pattern_value(rank_pattern, name, m.r))
            if r != m.r:
                _resize(m, r)
    layers = lora_layers(model)
    plan = []
    seen = set()
    for key, t in tensors.items():
        inner = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", inner)
        if match is None:
            raise ValueError(f"{wfile}: unsupported key {key!r} (only lora_A/lora_B weights "
                             "are understood)")
        name, part = match.groups()
        if name not in layers:
            raise ValueError(f"{wfile}: key {key!r} names no QLoRALinear layer of the model "
                             f"(module {name!r}; adapted layers: {sorted(layers)[:5]} ...)")
        layer = getattr(layers[name], part)
        if tuple(t.shape) != tuple(layer.weight.shape):
            raise ValueError(f"{wfile}: key {key!r} has shape {tuple(t.shape)}, the model's "
                             f"{name}.{part}.weight is {tuple(layer.weight.shape)}")
        plan.append((layer.weight, t))
        seen.add((name, part))
    if strict:
        for name in layers:
            for part in ("lora_A", "lora_B"):
                if (name, part) not in seen:
                    raise ValueError(f"{wfile}: missing key {PREFIX}{name}.{part}.weight")
    with torch.no_grad():
        for weight, t in plan:
            weight.copy_(t.to(weight.device))
    for name, m in layers.items():
        m.set_scale(_pattern_value(alpha_pattern, name, cfg["lora_alpha"]),
                    bool(cfg.get("use_rslora", False)))
    return model
