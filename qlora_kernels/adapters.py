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

import glob
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from typing import Dict, Optional

import torch
from torch import nn

from .fileio import make_temp_dir
from .lora import QLoRALinear
from .prepare import (linear_names, lora_layers, match_module_name, prepare_model,
                      resolve_target_modules)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Safetensors metadata key holding the config fields the weights depend on, so that a
# reader can tell a weights file and a config from different saves apart (PEFT ignores it).
PAIRING_KEY = "qlora_kernels.adapter"
_PAIRED_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
                  "alpha_pattern")
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


def _pairing(cfg: dict) -> str:
    return json.dumps({k: cfg.get(k) for k in _PAIRED_FIELDS}, sort_keys=True)


def _siblings(path: str, kind: str) -> list:
    """Leftovers of saves to ``path``: ``.<name>.tmp-*`` (a new version being written) or
    ``.<name>.old-*`` (the previous version, between the two renames of a switch)."""
    parent, base = os.path.split(path)
    return sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.{kind}-*")),
                  key=os.path.getmtime)


def recover_adapter_dir(path: str) -> None:
    """Finish what an interrupted ``save_adapter`` left: if ``path`` is missing while the
    previous version waits under its ``.old-*`` name (killed between the two renames), put
    it back; then remove stray ``.tmp-*`` / ``.old-*`` siblings. Called by every save and
    load; needs write access to ``path``'s parent only when there is something to do.

    Example:
        >>> import os, tempfile
        >>> parent = tempfile.mkdtemp(); os.mkdir(os.path.join(parent, ".adapter.old-x"))
        >>> recover_adapter_dir(os.path.join(parent, "adapter")); os.listdir(parent)
        ['adapter']
    """
    path = os.path.abspath(path)
    olds = _siblings(path, "old")
    if olds and not os.path.lexists(path):
        os.rename(olds.pop(), path)
    for leftover in _siblings(path, "tmp") + olds:
        shutil.rmtree(leftover, ignore_errors=True)


def _write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on the tensors and metadata: the
    header is written with its keys sorted (safetensors serializes ``__metadata__`` from a
    hash map, in an order that changes from process to process), so a resumed run's
    adapter equals an uninterrupted run's byte for byte."""
    from safetensors.torch import save

    blob = memoryview(save(tensors, metadata=metadata))
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(bytes(blob[8:8 + n])), separators=(",", ":"),
                        sort_keys=True).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(blob[8 + n:])


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None,
                 task_type: Optional[str] = "auto") -> None:
    """Write ``model``'s LoRA adapters to the directory ``path`` in PEFT's layout.

    The save is one transaction: both files are written into a new sibling directory
    (``.<name>.tmp-*``) and synced, then ``path`` is switched to it with two renames
    (old ``path`` -> ``.<name>.old-*``, new -> ``path``) and the old one deleted. Each
    directory ever named ``path`` holds one complete version; a kill between the renames
    leaves ``path`` missing and the previous version under ``.old-*``, which the next save
    or load puts back (``recover_adapter_dir``), and leftovers of interrupted saves are
    removed. Other plain files in ``path`` are carried over (hard links); a subdirectory
    there is refused, as the directory is replaced as a whole. The weights file records
    the config fields it depends on, so ``load_adapter`` refuses a mixed pair.
    Tensors are stored in the adapters' dtype; the same adapters and config give the same
    bytes in any process (a resumed run's adapter equals an uninterrupted run's). Files and
    directory get the usual permissions (0666 / 0777 less umask). ``task_type="auto"`` derives PEFT's task
    type from a transformers class name (``...ForCausalLM`` -> ``CAUSAL_LM``).

    Example:
        >>> import os, tempfile, torch, qlora_kernels as qk
        >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, verbose=False)
        >>> d = tempfile.mkdtemp(); qk.save_adapter(m, d); sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    config = adapter_config(model, base_model_name_or_path, task_type)
    tensors = {}
    for name, m in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight
            tensors[f"{PREFIX}{name}.{part}.weight"] = w.detach().to("cpu").contiguous().clone()
    path = os.path.realpath(path)
    recover_adapter_dir(path)
    extra = []
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise NotADirectoryError(f"save_adapter: {path} exists and is not a directory")
        for entry in os.scandir(path):
            if entry.name in (CONFIG_NAME, WEIGHTS_NAME) or entry.name.startswith(".tmp-"):
                continue  # ours (".tmp-*": an interrupted save of an older version)
            if entry.is_dir(follow_symlinks=False):
                raise IsADirectoryError(f"save_adapter: {path} holds the directory "
                                        f"{entry.name!r}; the adapter directory is replaced as a "
                                        "whole on each save, so use a dedicated one")
            extra.append(entry.name)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, f".{base}.tmp-")
    old = None
    try:
        _write_safetensors(os.path.join(tmp, WEIGHTS_NAME), tensors,
                           {"format": "pt", PAIRING_KEY: _pairing(config)})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        for name in extra:
            try:
                os.link(os.path.join(path, name), os.path.join(tmp, name), follow_symlinks=False)
            except OSError:
                shutil.copy2(os.path.join(path, name), os.path.join(tmp, name),
                             follow_symlinks=False)
        for name in (WEIGHTS_NAME, CONFIG_NAME, ""):
            _fsync(os.path.join(tmp, name))
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(path, old)  # replaces the empty placeholder directory
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync(parent)
    except BaseException:
        if old is not None and not os.path.lexists(path) and os.path.isdir(old):
            os.rename(old, path)  # interrupted between the renames: the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"{file}: {key} must be an object, got {cfg[key]!r}")
    targets = cfg.get("target_modules")
    if not (targets is None or isinstance(targets, str) or (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{file}: target_modules must be a string or a list of names, got "
                         f"{targets!r}")
    for key in ("peft_type", "r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{file}: missing field {key!r}")
    _positive_int(cfg["r"], f"{file}: r")
    for key, value in [("lora_alpha", cfg["lora_alpha"])] + list(
            (cfg.get("alpha_pattern") or {}).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ValueError(f"{file}: lora_alpha of {key!r} must be a finite number, got "
                             f"{value!r}")
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
    from safetensors import safe_open

    try:
        recover_adapter_dir(path)
    except OSError:
        pass  # a read-only location: read what is there
    cfg = read_adapter_config(path)
    wfile = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(wfile):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:
        with safe_open(wfile, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise ValueError(f"{wfile}: not a readable safetensors file: {exc}") from exc
    paired = metadata.get(PAIRING_KEY)
    if paired is not None and paired != _pairing(cfg):
        raise ValueError(f"{path}: {WEIGHTS_NAME} was saved with {paired}, but {CONFIG_NAME} "
                         f"says {_pairing(cfg)}: the two files come from different saves")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    layers = lora_layers(model)
    if layers:
        shapes = {n: {part: tuple(getattr(m, part).weight.shape) for part in ("lora_A", "lora_B")}
                  for n, m in layers.items()}
    else:  # the layers prepare_model would make, from the config
        shapes = {}
        for name in resolve_target_modules(model, cfg.get("target_modules") or "all-linear"):
            layer = model.get_submodule(name)
            r = _positive_int(_pattern_value(rank_pattern, name, cfg["r"]),
                              f"{path}: rank of {name!r}")
            shapes[name] = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r)}
    # Every key checked before the model is touched.
    plan, seen = [], set()
    for key, t in tensors.items():
        inner = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", inner)
        if match is None:
            raise ValueError(f"{wfile}: unsupported key {key!r} (only lora_A/lora_B weights "
                             "are understood)")
        name, part = match.groups()
        if name not in shapes:
            raise ValueError(f"{wfile}: key {key!r} names no QLoRALinear layer of the model "
                             f"(module {name!r}; adapted layers: {sorted(shapes)[:5]} ...)")
        if (name, part) in seen:
            raise ValueError(f"{wfile}: key {key!r} repeats the weight {name}.{part}")
        if tuple(t.shape) != shapes[name][part]:
            raise ValueError(f"{wfile}: key {key!r} has shape {tuple(t.shape)}, the model's "
                             f"{name}.{part}.weight is {shapes[name][part]}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{wfile}: key {key!r} is {t.dtype} with NaN/Inf or non-float "
                             "values")
        plan.append((name, part, t))
        seen.add((name, part))
    if strict:
        for name in shapes:
            for part in ("lora_A", "lora_B"):
                if (name, part) not in seen:
                    raise ValueError(f"{wfile}: missing key {PREFIX}{name}.{part}.weight")
    if not layers:
        prepare_kwargs.setdefault("verbose", False)
        prepare_model(model, target_modules=cfg.get("target_modules") or "all-linear",
                      r=int(cfg["r"]), lora_alpha=cfg["lora_alpha"],
                      lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                      use_rslora=bool(cfg.get("use_rslora", False)), **prepare_kwargs)
        layers = lora_layers(model)
        for name, m in layers.items():
            if shapes[name]["lora_A"][0] != m.r:
                _resize(m, shapes[name]["lora_A"][0])
    with torch.no_grad():
        for name, part, t in plan:
            weight = getattr(layers[name], part).weight
            weight.copy_(t.to(weight.device))
    for name, m in layers.items():
        m.set_scale(_pattern_value(alpha_pattern, name, cfg["lora_alpha"]),
                    bool(cfg.get("use_rslora", False)))
    return model


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")
    return value
