"""``Linear4bit``: an ``nn.Linear`` whose weight is frozen in 4 bits.

The packed weight is a ``requires_grad=False`` uint8 parameter named ``weight`` and its
quantization state lives in buffers, so ``.to(device)``, ``copy.deepcopy`` and pickling
work as for any module; ``state_dict`` uses the bitsandbytes key layout
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a transformers
4-bit checkpoint's tensors load into it.

Example:
    >>> import torch, qlora_kernels as qk
    >>> lin4 = qk.Linear4bit.from_linear(torch.nn.Linear(128, 64))
    >>> lin4(torch.randn(2, 128)).shape
    torch.Size([2, 64])
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..functional import dequantize_4bit, quantize_4bit
from ..compute_dtype import resolve_compute_dtype
from ..matmul import matmul_4bit_call
from ..quant_state import STATE_TENSOR_KEYS, QuantState
from ..packed_storage import (QUANT_STORAGE_DTYPES, check_storage,  # noqa: F401
                             is_dtensor, packed_to_storage, storage_to_packed)

_FROZEN = ("weight",) + STATE_TENSOR_KEYS
class Linear4bit(nn.Module):
    """``y = x @ W^T + b`` with W stored 4-bit (NF4/FP4/INT4, optional double quantization).

    Gradients flow to ``x`` (and ``bias``), never to the frozen weight. ``x`` is cast to
    ``compute_dtype`` (default: x's own dtype; ``"auto"``: see
    ``qlora_kernels.compute_dtype.resolve_compute_dtype``) and the result back to x's dtype.
    The arguments follow bitsandbytes' ``Linear4bit`` (``compress_statistics`` is accepted
    for ``double_quant``); ``compute_dtype`` comes right before ``quant_type`` here, in
    ``from_linear`` and in ``prepare_model``.
    The compute dtype must be float32, float16 or bfloat16 (float64 x needs a
    ``compute_dtype``).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> lin = qk.Linear4bit(256, 128, compute_dtype=torch.bfloat16)
        >>> lin.weight.dtype, lin.weight.requires_grad
        (torch.uint8, False)
    """

    quant_storage = torch.uint8  # instance attribute once set; see set_quant_storage

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: Union[None, str, torch.dtype] = None, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: Optional[bool] = None,
                 dq_code: Union[str, torch.Tensor] = "fp8", device=None,
                 dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8, *,
                 compress_statistics: Optional[bool] = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = resolve_compute_dtype(compute_dtype, device)
        self.quant_storage = check_storage(quant_storage)
        # Initialise like nn.Linear, then quantize.
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.bias = None
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)
                                     .uniform_(-bound, bound))
        self._set_quantized(*quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                           double_quant=double_quant, dq_code=dq_code,
                                           compress_statistics=compress_statistics))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: Union[None, str, torch.dtype] = None,
                    quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: Optional[bool] = None,
                    dq_code: Union[str, torch.Tensor] = "fp8",
                    quant_storage: torch.dtype = torch.uint8, *,
                    compress_statistics: Optional[bool] = None) -> "Linear4bit":
        """Quantize an ``nn.Linear`` (its weight dtype is kept as the state's dtype).
        ``quant_storage``: the dtype the packed bytes are stored as (see ``set_quant_storage``).

        Example:
            >>> import torch, qlora_kernels as qk
            >>> qk.Linear4bit.from_linear(torch.nn.Linear(64, 32), quant_type="fp4").quant_type
            'fp4'
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                             requires_grad=linear.bias.requires_grad)
        packed, state = quantize_4bit(linear.weight.detach(), blocksize=blocksize,
                                      quant_type=quant_type, double_quant=double_quant,
                                      dq_code=dq_code, compress_statistics=compress_statistics)
        return cls.from_quantized(packed, state, bias=bias, compute_dtype=compute_dtype,
                                  quant_storage=quant_storage)

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: QuantState,
                       bias: Optional[torch.Tensor] = None,
                       compute_dtype: Union[None, str, torch.dtype] = None,
                       quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        """A layer around an already quantized weight (``state.shape`` is (out, in)), e.g.
        one read from a checkpoint; ``bias`` is used as given (no copy).

        Example:
            >>> import torch, qlora_kernels as qk
            >>> p, s = qk.quantize_4bit(torch.randn(32, 64))
            >>> qk.Linear4bit.from_quantized(p, s).out_features
            32
        """
        if len(state.shape) != 2:
            raise ValueError(f"a Linear4bit weight is 2-D (out, in), the state has shape "
                             f"{list(state.shape)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.compute_dtype = resolve_compute_dtype(compute_dtype, packed.device)
        self.quant_storage = check_storage(quant_storage)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else \
            nn.Parameter(bias, requires_grad=False)
        self._set_quantized(packed, state)
        return self

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight state has shape {list(state.shape)}, the layer is "
                             f"({self.out_features}, {self.in_features})")
        state.validate(packed)
        self.weight = nn.Parameter(packed_to_storage(packed, self.quant_storage), requires_grad=False)
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("quant_map", state.code, persistent=False)
        s2 = state.state2
        self.register_buffer("nested_absmax", None if s2 is None else s2.absmax, persistent=False)
        self.register_buffer("nested_quant_map", None if s2 is None else s2.code, persistent=False)
        self.offset = None if state.offset is None else float(state.offset)
        self.__dict__.pop("_state_cache", None)
        self.blocksize, self.quant_type, self.weight_dtype = state.blocksize, state.quant_type, state.dtype

    @property
    def packed_nbytes(self) -> int:
        return (self.out_features * self.in_features + 1) // 2

    @property
    def packed_weight(self) -> torch.Tensor:
        """The packed codes as uint8 ``(nbytes, 1)`` whatever ``quant_storage`` is (a view)."""
        w = self.weight
        if w.dtype != self.quant_storage:
            # FSDP's MixedPrecisionPolicy(param_dtype=...) casts floating-point parameters by
            # value before the all-gather, which destroys packed bytes stored as another float.
            raise RuntimeError(
                f"Linear4bit: the packed weight arrived as {w.dtype} but quant_storage is "
                f"{self.quant_storage}; something cast it by value (FSDP mixed precision "
                f"with param_dtype={w.dtype}?). Use quant_storage=torch.uint8 or "
                f"quant_storage equal to param_dtype (qlora_kernels.distributed.set_quant_storage)")
        return storage_to_packed(w, self.packed_nbytes)

    def set_quant_storage(self, dtype: torch.dtype) -> "Linear4bit":
        """Store the packed bytes as ``dtype`` (uint8, bfloat16, float16 or float32): the same
        bytes, viewed as ``(ceil(nbytes / itemsize), 1)`` elements of that dtype, so FSDP
        shards and all-gathers the 4-bit weight in the dtype of the parameters beside it.
        Forward, ``state_dict`` and saving always use the uint8 bitsandbytes layout.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> lin = qk.Linear4bit(64, 32).set_quant_storage(torch.bfloat16)
            >>> lin.weight.dtype, tuple(lin.weight.shape), tuple(lin.packed_weight.shape)
            (torch.bfloat16, (512, 1), (1024, 1))
        """
        packed = self.packed_weight
        self.quant_storage = check_storage(dtype)
        self.weight = nn.Parameter(packed_to_storage(packed, dtype), requires_grad=False)
        return self

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> QuantState:
        """The ``QuantState`` of the weight, built from the module's buffers (and kept while
        they are the same tensors: forward reads its op arguments from it)."""
        b = self._buffers
        key = (b["absmax"], b["quant_map"], b["nested_absmax"], b["nested_quant_map"])
        cached = self.__dict__.get("_state_cache")
        if cached is not None and all(x is y for x, y in zip(cached[0], key)):
            return cached[1]
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, shape=None, dtype=torch.float32,
                                blocksize=256, quant_type="8bit", code=self.nested_quant_map)
        state = QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                           dtype=self.weight_dtype, blocksize=self.blocksize,
                           quant_type=self.quant_type, code=self.quant_map,
                           offset=self.offset, state2=state2)
        self.__dict__["_state_cache"] = (key, state)
        return state

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight (out, in), in ``dtype`` (default: the original weight dtype).

        Example:
            >>> import torch, qlora_kernels as qk
            >>> qk.Linear4bit(64, 32).dequantize().shape
            torch.Size([32, 64])
        """
        return dequantize_4bit(self.packed_weight, self.quant_state, dtype=dtype)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"Linear4bit: input must be floating point, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0:
            raise ValueError(f"Linear4bit: input has shape (), expected (..., "
                             f"in_features={self.in_features})")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit: input has last dimension {x.shape[-1]}, expected "
                             f"in_features={self.in_features}")
        cdt = self.compute_dtype or x.dtype
        bias = self.bias
        if bias is not None and bias.dtype != cdt:
            bias = bias.to(cdt)
        y = matmul_4bit_call(x if x.dtype == cdt else x.to(cdt), self.packed_weight,
                             self.out_features, self.quant_state.op_args(), bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}"
                + ("" if self.quant_storage == torch.uint8 else f", quant_storage={self.quant_storage}"))

    # ------------------------------------------------------------------ device moves
    def _apply(self, fn, recurse=True):
        # Packed bytes and float32 scales must never be cast (model.to(torch.bfloat16) would
        # otherwise corrupt them): they follow device moves only.
        self.__dict__.pop("_state_cache", None)  # it would keep the old tensors alive
        frozen = {}
        for name in _FROZEN:
            t = self._parameters.pop(name, None) if name == "weight" else self._buffers.pop(name, None)
            frozen[name] = t
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in frozen.items():
                if t is not None:
                    moved = fn(t)
                    if moved.dtype != t.dtype:
                        moved = t.to(device=moved.device)
                    t = nn.Parameter(moved, requires_grad=False) if name == "weight" else moved
                if name == "weight":
                    self._parameters[name] = t
                else:
                    self._buffers[name] = t
        return self

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.weight
        if w.dtype != torch.uint8 and not is_dtensor(w):
            w = self.packed_weight  # the uint8 bitsandbytes layout whatever quant_storage is
        # (a sharded FSDP2 weight stays a DTensor in its storage dtype; distributed.py's
        # full_state_dict gathers it and converts it to uint8)
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        for key, t in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        parts = {k: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        if wkey not in state_dict:
            missing_keys.append(wkey)
        elif not parts:
            error_msgs.append(f"{wkey}: no quantization state (expected {wkey}.absmax, "
                              f"{wkey}.quant_map and {wkey}.quant_state.bitsandbytes__*)")
        else:
            try:
                state = QuantState.from_dict(parts, device=self.weight.device)
                # uint8 (bitsandbytes layout) or the storage dtype of a quant_storage weight
                packed = state_dict[wkey]
                if packed.dtype != torch.uint8:
                    packed = storage_to_packed(packed, (state.numel + 1) // 2)
                packed = packed.to(self.weight.device)
                if tuple(state.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"shape {list(state.shape)} does not match the layer "
                                     f"({self.out_features}, {self.in_features})")
                self._set_quantized(packed, state)
            except ValueError as exc:
                error_msgs.append(f"{wkey}: {exc}")
        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey in state_dict:
                b = state_dict[bkey]
                if b.shape != self.bias.shape:
                    error_msgs.append(f"{bkey}: shape {tuple(b.shape)}, expected {tuple(self.bias.shape)}")
                else:
                    with torch.no_grad():
                        self.bias.copy_(b)
            else:
                missing_keys.append(bkey)
        if strict:
            known = {wkey, bkey} | set(parts)
            for k in state_dict:
                if k.startswith(prefix) and k not in known and "." not in k[len(prefix):]:
                    unexpected_keys.append(k)
