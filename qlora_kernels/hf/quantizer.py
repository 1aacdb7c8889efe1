"""A transformers quantizer that loads a model straight into ``qlora_kernels.Linear4bit``.

``QuantizationConfig`` is registered under ``quant_method="qlora_kernels"``, so
``AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantizationConfig())``
quantizes each linear weight as it is read (transformers 5's weight-conversion hooks: one
dense weight in memory at a time), and a model saved with ``save_pretrained`` reloads from
its own ``config.json`` (the bitsandbytes tensor layout: ``weight``, ``weight.absmax``, ...).

Example (needs transformers):
    >>> import torch, qlora_kernels.hf as qkhf
    >>> qkhf.QuantizationConfig(compute_dtype=torch.bfloat16).to_dict()["compute_dtype"]
    'bfloat16'
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AutoHfQuantizer, register_quantization_config,
                                          register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import QUANT_TYPES, check_blocksize, check_quant_type
from ..functional import quantize_4bit
from ..nn import Linear4bit
from ..packed_storage import check_storage, storage_to_packed
from ..quant_state import STATE_TENSOR_KEYS, QuantState
from .mapped_files import copy_out_of_files, mapped_files, release_new_mappings

QUANT_METHOD = "qlora_kernels"
_PACKED_KEY = "weight.quant_state.bitsandbytes__"
# the names one quantized weight is saved under (bitsandbytes layout, see nn/linear4bit.py)
SERIALIZED_NAMES = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                    "weight.nested_quant_map"] + [_PACKED_KEY + q for q in QUANT_TYPES]


def _dtype(value, what: str) -> Optional[torch.dtype]:
    """A torch dtype from a dtype or its name (``"bfloat16"``, ``"torch.bfloat16"``)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"QuantizationConfig: {what}={value!r} is not a torch dtype")
    return dtype


@register_quantization_config(QUANT_METHOD)
class QuantizationConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes linear layers into ``qlora_kernels.Linear4bit``.

    Args:
        quant_type: "nf4", "fp4" or "int4" (``formats.QUANT_TYPES``).
        double_quant: store the block scales in 8 bits (QLoRA's double quantization).
        compute_dtype: dtype the layers compute in (default: the input's dtype).
        blocksize: elements per scale (``formats.SUPPORTED_BLOCKSIZES``).
        quant_storage: dtype the packed bytes are stored as (uint8, or a float dtype for FSDP).
        skip_modules: module names (or suffixes/regexes, transformers' rule) left dense;
            ``None`` keeps the default: the output embedding / tied weights.

    Unsupported values raise ValueError here, before any loading.

    Example:
        >>> import torch, qlora_kernels.hf as qkhf
        >>> qkhf.QuantizationConfig(quant_type="fp4", blocksize=128).blocksize
        128
    """

    def __init__(self, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: Union[torch.dtype, str, None] = None, blocksize: int = 64,
                 quant_storage: Union[torch.dtype, str] = torch.uint8,
                 skip_modules: Optional[list] = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.quant_type = check_quant_type(quant_type)
        self.double_quant = bool(double_quant)
        self.compute_dtype = _dtype(compute_dtype, "compute_dtype")
        if self.compute_dtype is not None and not self.compute_dtype.is_floating_point:
            raise ValueError(f"QuantizationConfig: compute_dtype must be floating point, "
                             f"got {self.compute_dtype}")
        self.blocksize = check_blocksize(blocksize)
        self.quant_storage = check_storage(_dtype(quant_storage, "quant_storage"))
        self.skip_modules = None if skip_modules is None else list(skip_modules)
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(f"QuantizationConfig: unknown field(s) {sorted(unknown)}")

    def settings(self) -> dict:
        """What decides the stored bytes of a layer (compared against a checkpoint's)."""
        return {"quant_type": self.quant_type, "double_quant": self.double_quant,
                "blocksize": self.blocksize}

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for key in ("compute_dtype", "quant_storage"):
            d[key] = None if d[key] is None else str(d[key]).removeprefix("torch.")
        return d


def _bare_linear4bit(in_features: int, out_features: int, bias: bool,
                     config: QuantizationConfig) -> Linear4bit:
    """An empty (meta) ``Linear4bit`` with the config's shapes: the skeleton the checkpoint's
    tensors are loaded into, built without quantizing anything."""
    lin = Linear4bit.__new__(Linear4bit)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = in_features, out_features
    lin.compute_dtype, lin.quant_storage = config.compute_dtype, config.quant_storage
    n, meta = in_features * out_features, torch.device("meta")
    nbytes = (n + 1) // 2
    storage_len = -(-nbytes // config.quant_storage.itemsize)
    lin.weight = nn.Parameter(torch.empty(storage_len, 1, dtype=config.quant_storage, device=meta),
                              requires_grad=False)
    blocks = -(-n // config.blocksize)
    dq = config.double_quant
    lin.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8 if dq else torch.float32,
                                              device=meta), persistent=False)
    lin.register_buffer("quant_map", torch.empty(16, device=meta), persistent=False)
    lin.register_buffer("nested_absmax", torch.empty(-(-blocks // 256), device=meta) if dq else None,
                        persistent=False)
    lin.register_buffer("nested_quant_map", torch.empty(256, device=meta) if dq else None,
                        persistent=False)
    lin.offset = 0.0
    lin.blocksize, lin.quant_type = config.blocksize, config.quant_type
    lin.weight_dtype = torch.float32
    lin.bias = nn.Parameter(torch.empty(out_features, device=meta)) if bias else None
    return lin


def quantize_weight(module_name: str, weight: torch.Tensor, config: QuantizationConfig,
                    bias: Optional[torch.Tensor] = None) -> Linear4bit:
    """The ``Linear4bit`` for one dense ``(out, in)`` weight (the single per-weight step of
    loading; a streaming loader can call or replace it). ``module_name`` only labels errors.

    Example:
        >>> import torch, qlora_kernels.hf as qkhf
        >>> lin = qkhf.quantize_weight("q_proj", torch.randn(32, 64), qkhf.QuantizationConfig())
        >>> lin.out_features, lin.in_features, lin.quant_type
        (32, 64, 'nf4')
    """
    if weight.dim() != 2:
        raise ValueError(f"{module_name}: expected a 2-D weight, got shape {list(weight.shape)}")
    lin = _bare_linear4bit(weight.shape[1], weight.shape[0], False, config)
    try:
        lin._set_quantized(*quantize_4bit(weight, blocksize=config.blocksize,
                                          quant_type=config.quant_type,
                                          double_quant=config.double_quant))
    except ValueError as exc:
        raise ValueError(f"{module_name}: {exc}") from exc
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def _finish_layer(model: nn.Module, module_name: str, new: Linear4bit, missing_keys) -> None:
    """Put ``new`` in place of the skeleton at ``module_name`` (keeping a bias loaded
    already) and mark the weight's keys as loaded."""
    old = model.get_submodule(module_name)
    if old.bias is not None and new.bias is None:
        new.bias = old.bias
    new.requires_grad_(False)
    # from_pretrained refills every non-persistent buffer with torch.empty_like after loading
    # (they are not in checkpoints, for most modules); the quantization state is, and
    # Linear4bit's own state-dict hooks save and load it, so it must not be refilled.
    new._non_persistent_buffers_set.difference_update(STATE_TENSOR_KEYS)
    model.set_submodule(module_name, new)
    if missing_keys is not None:
        for key in [k for k in missing_keys if k.startswith(module_name + ".weight")]:
            missing_keys.discard(key)


class QuantizeOnLoad(ConversionOps):
    """Quantizes one dense checkpoint weight as it arrives (``quantize_weight``), then drops
    the pages it read of the checkpoint's memory maps from the process (mapped_files.py):
    transformers keeps the maps open for the whole load, so otherwise the whole dense
    checkpoint ends up resident."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name = param_name.rpartition(".")[0]
            new = quantize_weight(module_name, value, self.hf_quantizer.quantization_config)
            del value
            before = self.hf_quantizer.files_mapped_before_loading
            if before is not None:
                release_new_mappings(before)
            _finish_layer(model, module_name, new, missing_keys)
        return {}


class DeserializeQuantized(ConversionOps):
    """Rebuilds a ``Linear4bit`` from its saved tensors (``weight`` + ``weight.*``)."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        if len(input_dict) == 1:  # a weight that is not quantized (norms, embeddings)
            return input_dict
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module_name = full_layer_name.rpartition(".")[0]
        packed = tensors.pop("weight")
        state = QuantState.from_dict(tensors, device=packed.device)
        config = self.hf_quantizer.quantization_config
        found = {"quant_type": state.quant_type, "double_quant": state.nested,
                 "blocksize": int(state.blocksize)}
        if found != config.settings():
            raise ValueError(f"{module_name}: the checkpoint was quantized with {found}, the "
                             f"QuantizationConfig asks for {config.settings()}")
        if packed.dtype != torch.uint8:
            packed = storage_to_packed(packed, (state.numel + 1) // 2)
        new = _bare_linear4bit(state.shape[1], state.shape[0], False, config)
        new._set_quantized(packed, state)  # stored as config.quant_storage
        _finish_layer(model, module_name, new, missing_keys)
        return {}


@register_quantizer(QUANT_METHOD)
class QLoRAKernelsHfQuantizer(HfQuantizer):
    """transformers' side of ``QuantizationConfig``: replaces each ``nn.Linear`` (except
    ``skip_modules`` and the output embedding) by an empty ``Linear4bit`` before loading,
    then fills it from the checkpoint (quantizing dense weights on the way in)."""

    requires_calibration = False
    files_mapped_before_loading = None  # set when loading starts (see QuantizeOnLoad)
    serialized_names = {"weight": SERIALIZED_NAMES}

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        config = self.quantization_config
        self.files_mapped_before_loading = mapped_files()  # the checkpoint is not open yet
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.skip_modules, model._keep_in_fp32_modules)
        replaced = 0
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and should_convert_module(name, self.modules_to_not_convert):
                model.set_submodule(name, _bare_linear4bit(
                    module.in_features, module.out_features, module.bias is not None, config))
                replaced += 1
        if not replaced:
            warnings.warn(f"QuantizationConfig: {type(model).__name__} has no nn.Linear layer to "
                          f"quantize (skipped: {sorted(self.modules_to_not_convert)}); the model "
                          "loads unquantized", UserWarning, stacklevel=2)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # what the model keeps as read (embeddings, norms, stored 4-bit bytes) would stay a
        # view of the checkpoint's memory map, tied to a file that may be rewritten
        copy_out_of_files(model)
        self.files_mapped_before_loading = None  # later mappings are not this load's
        model.is_loaded_in_4bit = True  # PEFT's k-bit preparation keys on it
        # transformers' num_parameters (Trainer calls it every step) reads that flag as
        # "bitsandbytes is loaded" and imports bitsandbytes: count without the flag.
        original = type(model).num_parameters

        def num_parameters(only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
            model.is_loaded_in_4bit = False
            try:
                return original(model, only_trainable=only_trainable,
                                exclude_embeddings=exclude_embeddings)
            finally:
                model.is_loaded_in_4bit = True

        model.num_parameters = num_parameters
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        # model.dequantize(): each Linear4bit becomes a dense nn.Linear (one rounding)
        for name, lin in list(model.named_modules()):
            if isinstance(lin, Linear4bit):
                dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  device=lin.weight.device, dtype=dtype or lin.weight_dtype)
                with torch.no_grad():
                    dense.weight.copy_(lin.dequantize(torch.float32))
                    if lin.bias is not None:
                        dense.bias.copy_(lin.bias)
                model.set_submodule(name, dense)
        return model

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": DeserializeQuantized}


def _check_merged_configs(original):
    """transformers keeps a checkpoint's quantization_config and drops the one passed to
    ``from_pretrained`` with a warning; for ours a different request is an error."""
    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        ours = isinstance(quantization_config_from_args, QuantizationConfig)
        saved = quantization_config
        if ours and isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD:
            saved = QuantizationConfig.from_dict(saved)
        if ours and isinstance(saved, QuantizationConfig) \
                and saved.settings() != quantization_config_from_args.settings():
            raise ValueError(f"the checkpoint was quantized with {saved.settings()}, the "
                             f"QuantizationConfig passed asks for "
                             f"{quantization_config_from_args.settings()}; drop "
                             "quantization_config to load it as saved")
        return original.__func__(cls, quantization_config, quantization_config_from_args)
    merge_quantization_configs._qlora_kernels = True
    return classmethod(merge_quantization_configs)


if not getattr(AutoHfQuantizer.merge_quantization_configs, "_qlora_kernels", False):
    AutoHfQuantizer.merge_quantization_configs = _check_merged_configs(
        AutoHfQuantizer.__dict__["merge_quantization_configs"])
