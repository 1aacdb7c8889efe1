"""``from_pretrained``: a transformers checkpoint streamed straight into 4-bit.

The architecture is built with its parameters on the meta device (buffers such as rotary
tables are computed for real: they are small and often not in the checkpoint). Every
check runs before the first tensor is read: the shards' headers, keys against the model,
shapes against the config, the quantization config of a prequantized checkpoint. Then the
tensors are read one at a time (``Checkpoint.read`` reads that one tensor's bytes), the
next one on a thread while the current one is quantized, and each goes through
``load_tensor``: a target Linear's weight is quantized on the target device and the meta
``nn.Linear`` replaced by a ``Linear4bit``; any other tensor is materialized in the
compute dtype. So the peak is the final model plus two dense tensors (the one being
quantized, with its quantization scratch, and the one being read).

Example:
    >>> import qlora_kernels as qk
    >>> model = qk.from_pretrained("path/to/llama", r=16, lora_alpha=32)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ..functional import quantize_4bit
from ..nn import Linear4bit
from ..prepare import match_module_name, prepare_model, resolve_target_modules
from .bnb_checkpoint import check_bnb_config, quantized_weights, read_quantized_weight
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_ARGS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "init", "adapter_dtype")
# prepare_model's training options, used with LoRA arguments
TRAINING_ARGS = ("chunked_loss", "selective_checkpointing")


@dataclass
class QuantSpec:
    """How ``load_tensor`` quantizes a target weight, and where tensors go."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    dq_code: str = "fp8"
    compute_dtype: torch.dtype = torch.bfloat16
    device: Union[str, torch.device] = "cpu"


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init work)
    and their buffers for real.

    Example:
        >>> with params_on_meta():
        ...     lin = torch.nn.Linear(4096, 4096)
        >>> lin.weight.device.type
        'meta'
    """
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set_tensor(model: nn.Module, names: Sequence[str], tensor: torch.Tensor) -> None:
    # one Parameter object for all the names, so tied weights stay tied
    param = None
    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if leaf in mod._parameters:
            if param is None:
                old = mod._parameters[leaf]
                param = nn.Parameter(tensor, requires_grad=old is not None and old.requires_grad)
            mod._parameters[leaf] = param
        else:
            mod._buffers[leaf] = tensor


def load_tensor(model: nn.Module, name: str, tensor: torch.Tensor, spec: QuantSpec,
                quantize: bool = False, aliases: Sequence[str] = ()) -> None:
    """Put one checkpoint tensor into a model built by ``params_on_meta``.

    With ``quantize``, ``name`` is an ``nn.Linear``'s weight: it is quantized on
    ``spec.device`` and the Linear replaced by a ``Linear4bit`` (its bias, loaded or still
    on meta, moves over). Otherwise a floating tensor is stored in ``spec.compute_dtype``
    on ``spec.device`` under ``name`` and every name in ``aliases`` (tied weights).

    Example:
        >>> with params_on_meta():
        ...     m = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> load_tensor(m, "0.weight", torch.randn(32, 64), QuantSpec(), quantize=True)
        >>> type(m[0]).__name__
        'Linear4bit'
    """
    if quantize:
        mod_name, _, leaf = name.rpartition(".")
        linear = model.get_submodule(mod_name)
        if leaf != "weight" or not isinstance(linear, nn.Linear):
            raise ValueError(f"{name}: only an nn.Linear weight can be quantized")
        packed, state = quantize_4bit(tensor.to(spec.device), blocksize=spec.blocksize,
                                      quant_type=spec.quant_type,
                                      double_quant=spec.double_quant, dq_code=spec.dq_code)
        _replace_module(model, mod_name, Linear4bit.from_quantized(
            packed, state, bias=linear.bias, compute_dtype=spec.compute_dtype))
        return
    if tensor.is_floating_point():
        tensor = tensor.to(device=spec.device, dtype=spec.compute_dtype)
    else:
        tensor = tensor.to(spec.device)
    _set_tensor(model, [name, *aliases], tensor)


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---------------------------------------------------------------------------- planning
def resolve_compute_dtype(compute_dtype, device) -> torch.dtype:
    """The loader's compute dtype: a dtype name is read as that dtype, then
    ``qlora_kernels.compute_dtype.resolve_compute_dtype`` checks it or resolves ``"auto"``
    (bf16 on CUDA and on CPUs with native bf16, else float32); fp16 on a CUDA device
    without bf16.

    Example:
        >>> resolve_compute_dtype("float32", "cpu")
        torch.float32
    """
    from ..compute_dtype import resolve_compute_dtype as resolve_checked

    if isinstance(compute_dtype, str) and compute_dtype != "auto":
        if compute_dtype not in _DTYPE_NAMES:
            raise ValueError(f"compute_dtype must be 'auto', a torch dtype or one of "
                             f"{sorted(_DTYPE_NAMES)}, got {compute_dtype!r}")
        compute_dtype = _DTYPE_NAMES[compute_dtype]
    if compute_dtype is None:
        raise ValueError("compute_dtype must be 'auto' or a dtype for a loaded model, got None")
    dt = resolve_checked(compute_dtype, device)
    if dt == torch.bfloat16 and torch.device(device).type == "cuda" \
            and not torch.cuda.is_bf16_supported():
        dt = torch.float16
    return dt


def _build_empty(config, config_path: str, compute_dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    except (ValueError, KeyError) as exc:
        arch = getattr(config, "architectures", None) or getattr(config, "model_type", "?")
        raise CheckpointError(f"{config_path}: unsupported architecture {arch}: {exc}") from exc
    return model


def _alias_groups(model: nn.Module) -> Dict[str, List[str]]:
    by_id: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _ignored(model: nn.Module, attr: str, key: str) -> bool:
    patterns = getattr(model, attr, None) or []
    return any(re.search(p, key) for p in patterns)


@dataclass
class _Plan:
    units: list              # ("quantized", weight, qs_key) | ("dense", key, quantize) in read order
    quantized: List[str]     # module names that end up Linear4bit


def _plan(model: nn.Module, ckpt: Checkpoint, prequantized: bool, target_modules,
          skip_modules) -> _Plan:
    aliases = _alias_groups(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    pre = quantized_weights(ckpt) if prequantized else {}
    if prequantized:
        targets = [w[: -len(".weight")] for w in pre]
    else:
        targets = resolve_target_modules(model, target_modules)
        if skip_modules:
            targets = [t for t in targets if not match_module_name(t, list(skip_modules))]
    target_weights = {t + ".weight" for t in targets}
    for w in target_weights:
        if len(aliases.get(w, [w])) > 1:
            raise ValueError(f"{w} is tied to {aliases[w]}: a tied weight is not quantized "
                             f"(leave it out of target_modules)")
        mod = model.get_submodule(w[: -len(".weight")]) if w in params else None
        if not isinstance(mod, nn.Linear):
            where = ckpt.location.get(w + ".quant_state.bitsandbytes__nf4") or ckpt.directory
            raise CheckpointError(f"{where}: {w!r} is not an nn.Linear weight of "
                                  f"{type(model).__name__}")

    loaded = set()
    units = []
    state_keys = {k for w in pre for k in ckpt.keys() if k.startswith(w + ".")}
    for key in ckpt.keys():
        path = ckpt.location[key]
        if key in pre:
            mod = model.get_submodule(key[: -len(".weight")])
            units.append(("quantized", key, pre[key]))
            loaded.add(key)
            _check_prequantized_shape(ckpt, key, pre[key], (mod.out_features, mod.in_features))
            continue
        if key in state_keys:
            continue
        want = params[key].shape if key in params else (
            buffers[key].shape if key in buffers else None)
        if want is None:
            if _ignored(model, "_keys_to_ignore_on_load_unexpected", key):
                continue
            raise CheckpointError(f"{path}: tensor {key!r} does not belong to "
                                  f"{type(model).__name__} (a checkpoint of another model?)")
        if tuple(ckpt.shape(key)) != tuple(want):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(ckpt.shape(key))}, "
                                  f"the config gives {list(want)}")
        if key in target_weights and not ckpt.dtype(key).is_floating_point:
            raise CheckpointError(f"{path}: tensor {key!r} is {ckpt.dtype(key)}, not a float "
                                  f"weight to quantize")
        units.append(("dense", key, key in target_weights))
        loaded.update(aliases.get(key, [key]))
    missing = [n for n in params if n not in loaded
               and not _ignored(model, "_keys_to_ignore_on_load_missing", n)]
    if missing:
        raise CheckpointError(f"{ckpt.directory}: the checkpoint lacks {len(missing)} "
                              f"tensor(s) of {type(model).__name__}, e.g. {missing[:3]}")
    return _Plan(units, targets)


def _check_prequantized_shape(ckpt: Checkpoint, weight: str, qs_key: str, want) -> None:
    from ..quant_state import unpack_tensor_to_dict

    try:
        shape = tuple(unpack_tensor_to_dict(ckpt.read(qs_key))["shape"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{ckpt.location[qs_key]}: {qs_key!r}: {exc}") from exc
    if shape != tuple(want):
        raise CheckpointError(f"{ckpt.location[qs_key]}: {qs_key!r} has shape {list(shape)}, "
                              f"the config gives {list(want)}")


# ---------------------------------------------------------------------------- loading
def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, unit="tensor", desc="loading")
        except ImportError:
            pass
    return None


def from_pretrained(path, *, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype="auto", device="cpu",
                    target_modules: Union[str, Sequence[str]] = "all-linear",
                    skip_modules: Optional[Sequence[str]] = None, blocksize: int = 64,
                    dq_code: str = "fp8", progress: bool = True, verbose: bool = False,
                    **prepare_kwargs) -> nn.Module:
    """Load a causal LM checkpoint with its linear layers in 4-bit, without ever holding
    the dense model.

    ``path``: a local transformers directory with safetensors weights (one file, or shards
    with ``model.safetensors.index.json``), or a ``.gguf`` file. A directory written by
    transformers + bitsandbytes (``quantization_config.quant_method == "bitsandbytes"``,
    4-bit) loads its stored 4-bit weights as they are (the quantization arguments are then
    ignored). Otherwise the layers chosen by ``target_modules`` (PEFT's rules: with
    ``"all-linear"`` every Linear but the output head) less ``skip_modules`` are quantized
    as their weights arrive, on ``device``; every other tensor is stored in
    ``compute_dtype`` (``"auto"``: see ``resolve_compute_dtype``). Tied weights stay tied.
    LoRA arguments (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init``,
    ``adapter_dtype``) wrap the 4-bit layers as ``prepare_model`` does, with its training
    options ``chunked_loss`` and ``selective_checkpointing`` when given.

    Every check (files, keys, shapes, config) runs before the first tensor is read;
    problems raise ``CheckpointError`` (a ValueError) naming the file and key. ``progress``
    shows a bar over tensors (tqdm); ``verbose`` prints the read / quantize / other split.

    Example:
        >>> import qlora_kernels as qk
        >>> model = qk.from_pretrained("path/to/llama", r=16)  # doctest: +SKIP
    """
    unknown = sorted(set(prepare_kwargs) - set(LORA_ARGS) - set(TRAINING_ARGS))
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments {unknown}; LoRA arguments "
                        f"are {list(LORA_ARGS)}, with the options {list(TRAINING_ARGS)}")
    if prepare_kwargs and not set(prepare_kwargs) & set(LORA_ARGS):
        raise TypeError(f"from_pretrained: {sorted(prepare_kwargs)} apply to the LoRA layers; "
                        f"give LoRA arguments too (e.g. r=16)")
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from .gguf import from_gguf
        return from_gguf(path, quant_type=quant_type, double_quant=double_quant,
                         compute_dtype=compute_dtype, device=device,
                         target_modules=target_modules, skip_modules=skip_modules,
                         blocksize=blocksize, dq_code=dq_code, progress=progress,
                         verbose=verbose, **prepare_kwargs)
    from transformers import AutoConfig

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing (not a transformers checkpoint "
                              f"directory)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{config_path}: unsupported or unreadable config: {exc}") from exc
    bnb = check_bnb_config(getattr(config, "quantization_config", None), config_path)
    if bnb is not None:
        del config.quantization_config
        quant_type = bnb["quant_type"]
        if compute_dtype == "auto" and bnb["compute_dtype"] in _DTYPE_NAMES:
            compute_dtype = bnb["compute_dtype"]
    ckpt = open_checkpoint(path)
    spec = QuantSpec(quant_type, blocksize, double_quant, dq_code,
                     resolve_compute_dtype(compute_dtype, device), device)
    model = _build_empty(config, config_path, spec.compute_dtype)
    plan = _plan(model, ckpt, bnb is not None, target_modules, skip_modules)
    return _load(model, ckpt, plan, spec, progress, verbose, prepare_kwargs)


class _Prefetcher:
    """Reads the plan's dense tensors one ahead on a thread, so the disk works while the
    previous tensor is quantized. A tensor to be quantized goes into one of two reused
    scratch buffers (the one being quantized, the one being read: no allocation per tensor,
    so nothing fragments the heap between the model's long-lived tensors); a kept tensor
    gets its own memory, which the model keeps."""

    def __init__(self, ckpt: Checkpoint, units: list):
        from concurrent.futures import ThreadPoolExecutor

        self.ckpt = ckpt
        self.dense = [(key, quantize) for kind, key, quantize in units if kind == "dense"]
        size = max((ckpt.nbytes(k) for k, q in self.dense if q), default=0) \
            if ckpt.reads_into_buffer else 0
        self.scratch = [torch.empty(size, dtype=torch.uint8) for _ in range(2 if size else 0)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qk-read")
        self.pending = {}
        self.next = 0
        self.read_seconds = 0.0

    def _read(self, i: int) -> torch.Tensor:
        key, quantize = self.dense[i]
        t0 = time.perf_counter()
        tensor = self.ckpt.read(key, out=self.scratch[i % 2] if quantize and self.scratch else None)
        self.read_seconds += time.perf_counter() - t0
        return tensor

    def get(self) -> torch.Tensor:
        """The next dense tensor in plan order; starts reading the one after it."""
        i = self.next
        self.next += 1
        fut = self.pending.pop(i, None)
        tensor = fut.result() if fut is not None else self._read(i)
        if i + 1 < len(self.dense):  # its scratch buffer held tensor i - 1, done by now
            self.pending[i + 1] = self.pool.submit(self._read, i + 1)
        return tensor

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        self.pool.shutdown(wait=True)


def _load(model, ckpt: Checkpoint, plan: _Plan, spec: QuantSpec, progress: bool,
          verbose: bool, prepare_kwargs: dict) -> nn.Module:
    aliases = _alias_groups(model)
    times = {"read": 0.0, "quantize": 0.0, "other": 0.0}
    nbytes = 0
    bar = _progress(len(plan.units), progress)
    reader = _Prefetcher(ckpt, plan.units)
    t_start = time.perf_counter()
    try:
        for kind, key, extra in plan.units:
            t0 = time.perf_counter()
            if kind == "quantized":
                packed, state = read_quantized_weight(ckpt, key, extra, device=spec.device)
                t1 = time.perf_counter()
                mod_name = key[: -len(".weight")]
                linear = model.get_submodule(mod_name)
                _replace_module(model, mod_name, Linear4bit.from_quantized(
                    packed, state, bias=linear.bias, compute_dtype=spec.compute_dtype))
                nbytes += packed.numel()
                times["read"] += t1 - t0
                times["other"] += time.perf_counter() - t1
            else:
                tensor = reader.get()
                nbytes += tensor.numel() * tensor.element_size()
                t1 = time.perf_counter()
                load_tensor(model, key, tensor, spec, quantize=extra,
                            aliases=[a for a in aliases.get(key, [key]) if a != key])
                del tensor
                times["read"] += t1 - t0  # waiting for the reader: the read not overlapped
                times["quantize" if extra else "other"] += time.perf_counter() - t1
            if bar is not None:
                bar.update(1)
    finally:
        reader.close()
        if bar is not None:
            bar.close()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:  # a bias never loaded, a module the checkpoint does not cover
        raise CheckpointError(f"{ckpt.directory}: no tensor loaded for {still_meta[:3]}")
    model.eval()
    lora = {k: prepare_kwargs.pop(k) for k in list(prepare_kwargs)}
    if lora:
        prepare_model(model, target_modules=plan.quantized, compute_dtype=spec.compute_dtype,
                      verbose=verbose, **lora)
    if verbose:
        total = time.perf_counter() - t_start
        mib = nbytes / 2**20
        print(f"loaded {len(plan.units)} tensors, {mib:.0f} MiB in {total:.2f} s "
              f"({mib / max(total, 1e-9):.0f} MiB/s): reading {reader.read_seconds:.2f} s "
              f"({mib / max(reader.read_seconds, 1e-9):.0f} MiB/s, on a thread, overlapped; "
              f"waited for it {times['read']:.2f} s), quantize {times['quantize']:.2f} s, "
              f"other {times['other']:.2f} s")
    return model
