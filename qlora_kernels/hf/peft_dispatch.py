"""PEFT LoRA over ``qlora_kernels.Linear4bit``, with the user's plain ``LoraConfig``.

``LoraLinear4bit`` is PEFT's ``lora.Linear`` around our ``Linear4bit``: its forward is PEFT's
(adapters, dropout, scaling, disabled/mixed-batch adapters) and the base term is our 4-bit
matmul. Merging dequantizes once and replaces the base by a dense ``nn.Linear`` in the
dtype the model was loaded in (no re-quantization), so ``merge_and_unload()`` gives a dense model;
``unmerge`` puts the original 4-bit layer back bit for bit.

PEFT has no global registry of layer types: ``LoraConfig._register_custom_module`` is per
config and ``LoraModel._create_new_module`` builds its dispatcher list on each call. So
``install_peft_shim`` (run by ``import qlora_kernels.hf``) wraps that one method, and the
"all-linear" expansion, for the PEFT versions in ``KNOWN_PEFT_VERSIONS``; ``register_with``
is the explicit per-config route that patches nothing.

Example (needs peft):
    >>> import torch, peft, qlora_kernels as qk, qlora_kernels.hf
    >>> model = torch.nn.Sequential(qk.Linear4bit(64, 64))
    >>> m = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0"]))
    >>> type(m.base_model.model[0]).__name__
    'LoraLinear4bit'
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import Linear4bit

# PEFT versions whose LoraModel._create_new_module / _maybe_include_all_linear_layers this
# shim was checked against (signatures and call sites).
KNOWN_PEFT_VERSIONS = ("0.21.2",)


def _peft():
    import peft
    from peft.tuners.lora import layer
    return peft, layer


def _lora_linear_class():
    _, layer = _peft()

    class LoraLinear4bit(layer.Linear):
        """PEFT's LoRA ``Linear`` whose base layer is a ``qlora_kernels.Linear4bit``."""

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def resolve_lora_variant(self, *, config, **kwargs):
            variant = super().resolve_lora_variant(config=config, **kwargs)
            if variant is not None:
                raise ValueError(f"LoraLinear4bit supports plain LoRA only, not "
                                 f"{type(variant).__name__} (DoRA and other variants read the "
                                 "dense base weight)")
            return None

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            adapter_names = check_adapters_to_merge(self, adapter_names)
            adapter_names = [a for a in adapter_names if a in self.lora_A]
            if not adapter_names:
                return
            base = self.get_base_layer()
            if isinstance(base, Linear4bit):
                weight = base.dequantize(torch.float32)
                self.__dict__["_quantized_base"] = base  # not a submodule: kept for unmerge
            else:  # already merged once: the dense base
                weight = base.weight.float()
            for name in adapter_names:
                weight += self.get_delta_weight(name).float()
                if self.lora_bias[name]:
                    raise ValueError("LoraLinear4bit: merging lora_bias is not supported")
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights of {adapter_names}")
            # the dtype the model was loaded in (= compute dtype in the usual bf16/bf16
            # setup): a dense layer in another dtype would not accept the activations
            # around it. Same rule as QLoRALinear.merge.
            dtype = base.weight_dtype if isinstance(base, Linear4bit) else base.weight.dtype
            dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                              device=weight.device, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if base.bias is not None:
                    dense.bias.copy_(base.bias)
            dense.requires_grad_(False)
            self.base_layer = dense
            self.merged_adapters.extend(adapter_names)

        def unmerge(self) -> None:
            if not self.merged:
                import warnings
                warnings.warn("Already unmerged. Nothing to do.")
                return
            self.base_layer = self.__dict__.pop("_quantized_base")
            self.merged_adapters.clear()

        def __repr__(self) -> str:
            return "qlora_kernels." + super().__repr__()

    return LoraLinear4bit


_CLASS = None


def lora_linear4bit_class():
    """The ``LoraLinear4bit`` class (built on first use so that importing this module does
    not import peft).

    Example (needs peft):
        >>> lora_linear4bit_class().__name__
        'LoraLinear4bit'
    """
    global _CLASS
    if _CLASS is None:
        _CLASS = _lora_linear_class()
    return _CLASS


def dispatch_linear4bit(target: nn.Module, adapter_name: str, config, **kwargs):
    """PEFT dispatcher: a ``LoraLinear4bit`` for a ``Linear4bit`` target, else None."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, Linear4bit):
        return None
    kwargs = {k: v for k, v in kwargs.items() if k not in ("loaded_in_4bit", "loaded_in_8bit")}
    return lora_linear4bit_class()(target, adapter_name, config=config, **kwargs)


def all_linear_names(model: nn.Module) -> set:
    """Names of the ``Linear4bit`` layers PEFT's ``target_modules="all-linear"`` should add to
    its own ``nn.Linear`` set (the output embedding and layers inside adapters excluded).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> sorted(all_linear_names(torch.nn.Sequential(qk.Linear4bit(8, 8), torch.nn.ReLU())))
        ['0']
    """
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and module is not out:
            names.add(name)
    # layers inside an adapter layer (its base layer) are PEFT's business, not targets
    inner = {f"{p}.{s}" for p, m in model.named_modules() if hasattr(m, "get_base_layer")
             for s, _ in m.named_modules() if s}
    return names - inner


def register_with(lora_config, model: Optional[nn.Module] = None):
    """Make one ``LoraConfig`` wrap ``Linear4bit`` layers without the shim (PEFT's per-config
    custom-module mapping). With ``model`` and ``target_modules="all-linear"``, the targets
    are expanded here to PEFT's linear layers plus our ``Linear4bit`` layers.

    Example (needs peft):
        >>> import torch, peft, qlora_kernels as qk
        >>> cfg = register_with(peft.LoraConfig(r=2, target_modules=["0"]))
        >>> list(cfg._custom_modules.values())[0].__name__
        'LoraLinear4bit'
    """
    cls = lora_linear4bit_class()
    lora_config._register_custom_module({Linear4bit: cls})
    target = lora_config.target_modules
    if model is not None and isinstance(target, str) and target.lower() == "all-linear":
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
        lora_config = _maybe_include_all_linear_layers(lora_config, model)
        lora_config.target_modules = set(lora_config.target_modules) | all_linear_names(model)
    return lora_config


def install_peft_shim() -> bool:
    """Teach the installed PEFT to wrap ``Linear4bit`` layers for every ``LoraConfig``:
    wraps ``LoraModel._create_new_module`` (our dispatcher first) and PEFT's "all-linear"
    expansion (which only looks for ``nn.Linear``/``Conv1D``). Idempotent. Raises
    RuntimeError on a PEFT version not in ``KNOWN_PEFT_VERSIONS``; use ``register_with``
    there. Returns False when peft is not installed.

    Example (needs peft):
        >>> install_peft_shim()
        True
    """
    try:
        peft, _ = _peft()
    except ImportError:
        return False
    from peft.tuners import tuners_utils
    from peft.tuners.lora import model as lora_model
    if getattr(lora_model.LoraModel._create_new_module, "_qlora_kernels", False):
        return True
    if peft.__version__ not in KNOWN_PEFT_VERSIONS:
        raise RuntimeError(
            f"qlora_kernels.hf: peft {peft.__version__} is not a version the PEFT shim was "
            f"checked against ({', '.join(KNOWN_PEFT_VERSIONS)}); install one of those, or use "
            "qlora_kernels.hf.register_with(lora_config, model) instead of the shim "
            "(set QLORA_KERNELS_NO_PEFT_SHIM=1 to import qlora_kernels.hf without it)")
    create = lora_model.LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_linear4bit(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else create(lora_config, adapter_name, target, **kwargs)

    _create_new_module._qlora_kernels = True
    _create_new_module.__wrapped__ = create
    lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)

    include = tuners_utils._maybe_include_all_linear_layers

    def _maybe_include_all_linear_layers(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(target, str) and target.lower() == "all-linear"
        peft_config = include(peft_config, model)
        if all_linear:
            peft_config.target_modules = set(peft_config.target_modules) | all_linear_names(model)
        return peft_config

    _maybe_include_all_linear_layers.__wrapped__ = include
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    return True
