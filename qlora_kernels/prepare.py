"""One-call QLoRA conversion of a model (``prepare_model``) and merging back (``merge_lora``).

``prepare_model`` replaces each targeted ``nn.Linear`` by ``QLoRALinear(Linear4bit(...))``
one layer at a time: a layer is quantized, swapped into its parent and its dense weight
released before the next one is touched, so peak memory is the model plus one layer's
transient copies, never a second copy of the model. Every other parameter is frozen.

Target selection follows PEFT's conventions:
* ``"all-linear"``: every ``nn.Linear`` (or ``Linear4bit``) except the output head, i.e.
  the layer returned by ``model.get_output_embeddings()``, a layer whose weight is tied to
  an ``nn.Embedding``, or a layer named ``lm_head`` / ``embed_out``;
* a list of names: a module matches when its name equals an entry or ends with
  ``"." + entry`` (``["q_proj", "v_proj"]``);
* any other string: a regular expression that must match the whole module name.

Example:
    >>> import torch, qlora_kernels as qk
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    >>> _ = qk.prepare_model(mlp, r=4, lora_alpha=8, verbose=False)
    >>> type(mlp[0]).__name__, type(mlp[0].base_layer).__name__
    ('QLoRALinear', 'Linear4bit')
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .checkpointing import enable_selective_checkpointing
from .chunked_loss import chunked_causal_lm_loss
from .compute_dtype import resolve_compute_dtype
from .formats import FLOAT_DTYPES
from .lora import QLoRALinear
from . import _extension, memory
from .memory import parameter_counts, weight_bytes
from .nn import Linear4bit

_HEAD_NAMES = ("lm_head", "embed_out")
_INPUT_HOOK_ATTR = "_qlora_input_grad_hook"


# ---------------------------------------------------------------------------- selection
def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Linear4bit))


def linear_names(model: nn.Module) -> List[str]:
    """Names of the linear layers a LoRA could target: ``nn.Linear`` / ``Linear4bit``
    modules and existing ``QLoRALinear`` wrappers, never the layers inside a wrapper.

    Example:
        >>> import torch
        >>> linear_names(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        ['0']
    """
    names, wrapped = [], []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, QLoRALinear):
            wrapped.append(name)
            names.append(name)
        elif _is_linear(m):
            names.append(name)
    return names


def output_head_names(model: nn.Module) -> set:
    """Names of the layers treated as the output head by ``"all-linear"``."""
    heads = set()
    by_id = {id(m): n for n, m in model.named_modules()}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None and id(out) in by_id:
            heads.add(by_id[id(out)])
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if _is_linear(m) and (id(m.weight) in emb_weights or name.rsplit(".", 1)[-1] in _HEAD_NAMES):
            heads.add(name)
    return heads


def match_module_name(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    """PEFT's matching rule: a regex string must match the whole name; a list entry matches
    the name itself or a ``.``-separated suffix of it.

    Example:
        >>> match_module_name("model.layers.0.q_proj", ["q_proj"]), match_module_name("a.q", r".*\\.q")
        (True, True)
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_target_modules(model: nn.Module, target_modules: Union[str, Sequence[str]] = "all-linear"
                           ) -> List[str]:
    """The names of the (not yet wrapped) linear layers selected by ``target_modules``.

    Raises ValueError, listing some available layer names, when nothing matches.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> resolve_target_modules(m, ["1"])
        ['1']
    """
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        target_modules = sorted(str(t) for t in target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty")
    elif not isinstance(target_modules, str):
        raise TypeError(f"target_modules must be 'all-linear', a regex string or a list of "
                        f"names, got {type(target_modules).__name__}")
    elif target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {exc}") from exc
    available = linear_names(model)
    fresh = [n for n in available if not isinstance(model.get_submodule(n), QLoRALinear)]
    if target_modules == "all-linear":
        heads = output_head_names(model)
        chosen = [n for n in fresh if n not in heads and n != ""]
    else:
        chosen = [n for n in fresh if n != "" and match_module_name(n, target_modules)]
    if not chosen:
        shown = ", ".join(repr(n) for n in fresh[:8]) or "none"
        more = f" (and {len(fresh) - 8} more)" if len(fresh) > 8 else ""
        wrapped = len(available) - len(fresh)
        note = f"; {wrapped} layers are already QLoRALinear" if wrapped else ""
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer of "
                         f"{type(model).__name__}; available linear layers: {shown}{more}{note}")
    return chosen


def _summary_line(counts: Dict[str, int], before: int, after: int) -> str:
    pct = 100.0 * counts["trainable"] / max(counts["total"], 1)
    return (f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
            f"trainable%: {pct:.4f} || weight memory: {before / 2**20:.2f} MiB -> "
            f"{after / 2**20:.2f} MiB")


# ---------------------------------------------------------------------------- conversion
def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module called ``name`` (dotted path) by ``module``.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2)); set_module(m, "0", torch.nn.Identity()); m[0]
        Identity()
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def enable_input_require_grads(model: nn.Module) -> bool:
    """Make the input embeddings' output require grad (as PEFT does), so the adapters get
    gradients under reentrant gradient checkpointing, whose checkpointed blocks only
    backpropagate when an input requires grad. Returns True when a hook was installed.
    Models without ``get_input_embeddings`` are left alone: use
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` there.

    Example:
        >>> import torch
        >>> enable_input_require_grads(torch.nn.Linear(2, 2))
        False
    """
    if getattr(model, _INPUT_HOOK_ATTR, None) is not None:
        return True
    get_in = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get_in):
        try:
            emb = get_in()
        except (NotImplementedError, AttributeError):
            emb = None
    if not isinstance(emb, nn.Module):
        return False

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            output.requires_grad_(True)

    object.__setattr__(model, _INPUT_HOOK_ATTR, emb.register_forward_hook(hook))
    return True


def prepare_model(model: nn.Module, target_modules: Union[str, Sequence[str]] = "all-linear",
                  r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                  use_rslora: bool = False, init: str = "kaiming", quantize: bool = True,
                  compute_dtype: Union[None, str, torch.dtype] = "auto",
                  quant_type: str = "nf4", blocksize: int = 64, double_quant: Optional[bool] = None,
                  dq_code: Union[str, torch.Tensor] = "fp8",
                  adapter_dtype: Optional[torch.dtype] = None, verbose: bool = True,
                  quant_storage: torch.dtype = torch.uint8, chunked_loss: bool = True, *,
                  compress_statistics: Optional[bool] = None,
                  selective_checkpointing: Union[bool, str] = "auto",
                  cpu_block_cache: Union[bool, str] = "auto") -> nn.Module:
    """Convert ``model`` in place for QLoRA training and return it.

    Each targeted ``nn.Linear`` becomes ``QLoRALinear(Linear4bit.from_linear(...))`` (with
    ``quantize=False``: a LoRA over the dense layer; a ``Linear4bit`` target is wrapped as
    is). All other parameters, biases included, are frozen: only ``lora_A``/``lora_B``
    train. Adapters are in ``compute_dtype`` (with ``quantize=False``: the layer's dtype)
    unless ``adapter_dtype`` is given (e.g. ``torch.float32``). The input
    embeddings (when the model has ``get_input_embeddings``) get a hook making their output
    require grad, for gradient checkpointing. Prints one summary line unless
    ``verbose=False``. ``quant_storage`` (uint8, or bf16/fp16/fp32 views of the same
    bytes) is the packed weights' dtype, for FSDP (see docs/fsdp.md). ``compute_dtype``
    defaults to ``"auto"`` (``qlora_kernels.compute_dtype.resolve_compute_dtype``: bf16 on
    GPUs and on CPUs with native bf16, else float32); ``compress_statistics`` is
    bitsandbytes' name for ``double_quant``. ``chunked_loss``: a
    transformers causal LM called with ``labels`` computes its LM head and loss in chunks
    of tokens, never the full float32 logits, and returns ``logits=None`` then
    (chunked_loss.py); False keeps the model's own loss. ``selective_checkpointing``: the
    model's non-reentrant gradient checkpointing (transformers models; enabled before or
    after this call) keeps the outputs of the 4-bit matmuls and of attention for the
    backward instead of recomputing them: a third fewer 4-bit GEMMs per step for one
    (tokens x out_features) tensor per layer (checkpointing.py); False recomputes all;
    ``"auto"`` (default): on for a model on the CPU (compute-bound, memory to spare), off
    on GPUs, where checkpointing is mostly there to save memory. ``cpu_block_cache``: True
    turns on the process-wide CPU block cache (``qlora_kernels.memory.cpu_block_cache``:
    large blocks kept for the next step instead of fragmenting the C heap), ``"auto"``
    (default) does so for a model on the CPU (with the compiled extension); False leaves
    the allocator as it is.

    Raises ValueError (listing available names) when ``target_modules`` matches nothing.
    Arguments and every target weight (float dtype, finite values) are checked before the
    first layer is converted, so an error (naming the layer) leaves the model unchanged.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        >>> _ = qk.prepare_model(m, target_modules=["0"], r=4, verbose=False)
        >>> [n for n, p in m.named_parameters() if p.requires_grad]
        ['0.lora_A.weight', '0.lora_B.weight']
    """
    if isinstance(model, (QLoRALinear, nn.Linear, Linear4bit)):
        raise TypeError("prepare_model converts a model's sub-layers; wrap a single layer "
                        "with QLoRALinear(...) directly")
    for what, value in (("selective_checkpointing", selective_checkpointing),
                        ("cpu_block_cache", cpu_block_cache)):
        if value not in (True, False, "auto"):
            raise ValueError(f"prepare_model: {what} must be True, False or 'auto', got "
                             f"{value!r}")
    names = resolve_target_modules(model, target_modules)
    # the device only: holding the first parameter would keep its dense weight alive
    device = next((p.device for p in model.parameters()), None)
    on_cpu = device is None or device.type == "cpu"
    if selective_checkpointing == "auto":
        selective_checkpointing = on_cpu
    compute_dtype = resolve_compute_dtype(compute_dtype, device)
    _check_conversion(model, names, quantize, dict(
        quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
        compute_dtype=compute_dtype, dq_code=dq_code, quant_storage=quant_storage), dict(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, init=init,
        adapter_dtype=adapter_dtype or (compute_dtype if quantize else None)))
    before = weight_bytes(model)
    # Names only: holding the modules themselves would keep every dense weight alive.
    for name in names:
        layer = model.get_submodule(name)
        if quantize and isinstance(layer, nn.Linear):
            base = Linear4bit.from_linear(layer, quant_type=quant_type, blocksize=blocksize,
                                          double_quant=double_quant, compute_dtype=compute_dtype,
                                          dq_code=dq_code, quant_storage=quant_storage,
                                          compress_statistics=compress_statistics)
        else:
            base = layer
        wrapped = QLoRALinear(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              use_rslora=use_rslora, init=init,
                              adapter_dtype=adapter_dtype or (compute_dtype if quantize else None))
        set_module(model, name, wrapped)
        del layer, base, wrapped
    _freeze_all_but_lora(model)
    enable_input_require_grads(model)
    if chunked_loss:
        chunked_causal_lm_loss(model)
    if selective_checkpointing:
        enable_selective_checkpointing(model)
    if cpu_block_cache is True or (cpu_block_cache == "auto" and on_cpu
                                   and _extension.EXTENSION_LOADED):
        memory.cpu_block_cache(True)
    if verbose:
        print(_summary_line(parameter_counts(model), before, weight_bytes(model)))
    return model


def _check_conversion(model: nn.Module, names: List[str], quantize: bool, quant_args: dict,
                      lora_args: dict) -> None:
    """Everything that could stop ``prepare_model`` halfway, checked before the first layer
    is replaced: the arguments (by converting one tiny layer with them) and each target's
    weight (a float dtype the quantizer takes, finite values), so that a failure leaves
    the model as it was. Raises ValueError/TypeError naming the layer."""
    probe = nn.Linear(64, 64)
    QLoRALinear(Linear4bit.from_linear(probe, **quant_args) if quantize else probe, **lora_args)
    if not quantize:
        return
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            continue
        w = layer.weight
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"prepare_model: layer {name!r} has a {w.dtype} weight; 4-bit "
                            "quantization takes float32, float16 or bfloat16 (cast the model)")
        if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"prepare_model: layer {name!r} has {bad} NaN or Inf weight values; "
                             "nothing was converted")


def _freeze_all_but_lora(model: nn.Module) -> None:
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(True)


def lora_layers(model: nn.Module) -> Dict[str, QLoRALinear]:
    """``{module name: QLoRALinear}`` for every adapter layer of ``model``.

    Example:
        >>> import torch
        >>> lora_layers(torch.nn.Linear(2, 2))
        {}
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


def merge_lora(model: nn.Module, requantize: bool = False,
               dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold every adapter into its base layer, IN PLACE (like PEFT's ``merge_and_unload``),
    and return the model: each ``QLoRALinear`` is replaced by a dense ``nn.Linear`` holding
    ``W + scale * B @ A`` (computed in float32, rounded once to ``dtype``: by default the
    dtype the weight had before quantization, i.e. the model's dtype, which for a bf16
    model is the compute dtype), or with ``requantize=True`` by a new ``Linear4bit`` with
    the base's quantization settings.
    Layers are merged one at a time (no second copy of the model). A bare ``QLoRALinear``
    cannot be replaced in place; its merged layer is returned instead.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), r=2, verbose=False)
        >>> type(qk.merge_lora(m)[0]).__name__
        'Linear'
    """
    if isinstance(model, QLoRALinear):
        return model.merge(requantize=requantize, dtype=dtype)
    names = list(lora_layers(model))
    if not names:
        raise ValueError(f"merge_lora: {type(model).__name__} has no QLoRALinear layer to merge")
    for name in names:
        merged = model.get_submodule(name).merge(requantize=requantize, dtype=dtype)
        set_module(model, name, merged)
        del merged
    return model
