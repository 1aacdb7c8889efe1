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
from ..matmul import COMPUTE_DTYPES
from ..quant_state import QuantState

_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_FROZEN = ("weight",) + _STATE_BUFFERS
# dtypes the packed bytes may be viewed as (``quant_storage``): FSDP shards a parameter
# group in one dtype, so the 4-bit weight can take the dtype of the parameters beside it.
QUANT_STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def _check_compute_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None (x's dtype) or one of {COMPUTE_DTYPES}, "
                         f"got {dtype}")
    return dtype


def _check_storage(dtype: torch.dtype) -> torch.dtype:
    if dtype not in QUANT_STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {QUANT_STORAGE_DTYPES}, got {dtype}")
    return dtype


def packed_to_storage(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The packed uint8 bytes ``(nbytes, 1)`` viewed as ``dtype``: shape ``(ceil(nbytes /
    itemsize), 1)``, the tail padded with zero bytes when ``nbytes`` is not a multiple.
    No copy when no padding is needed.

    Example:
        >>> import torch
        >>> packed_to_storage(torch.arange(5, dtype=torch.uint8).view(5, 1), torch.bfloat16).shape
        torch.Size([3, 1])
    """
    _check_storage(dtype)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weight: expected uint8, got {packed.dtype}")
    if dtype == torch.uint8:
        return packed
    flat = packed.reshape(-1)
    pad = (-flat.numel()) % dtype.itemsize
    if pad or flat.storage_offset() % dtype.itemsize:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(dtype).view(-1, 1)


def storage_to_packed(weight: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Inverse of ``packed_to_storage``: the first ``nbytes`` bytes of ``weight`` as the uint8
    ``(nbytes, 1)`` tensor of the bitsandbytes layout (a view, no copy).

    Example:
        >>> import torch
        >>> w = packed_to_storage(torch.arange(5, dtype=torch.uint8).view(5, 1), torch.float32)
        >>> storage_to_packed(w, 5).flatten().tolist()
        [0, 1, 2, 3, 4]
    """
    if weight.dtype == torch.uint8:
        return weight if weight.shape == (nbytes, 1) else weight.reshape(-1)[:nbytes].view(nbytes, 1)
    flat = weight.reshape(-1).view(torch.uint8)
    if not nbytes <= flat.numel() < nbytes + weight.element_size():
        raise ValueError(f"packed weight: {weight.numel()} {weight.dtype} values hold "
                         f"{flat.numel()} bytes, expected {nbytes} (+ padding below one value)")
    return flat[:nbytes].view(nbytes, 1)


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2-sharded parameter), without
    importing torch.distributed."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


class Linear4bit(nn.Module):
    """``y = x @ W^T + b`` with W stored 4-bit (NF4/FP4/INT4, optional double quantization).

    Gradients flow to ``x`` (and ``bias``), never to the frozen weight. ``x`` is cast to
    ``compute_dtype`` (default: x's own dtype) and the result back to x's dtype; the compute
    dtype must be float32, float16 or bfloat16 (float64 x needs a ``compute_dtype``).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> lin = qk.Linear4bit(256, 128, compute_dtype=torch.bfloat16)
        >>> lin.weight.dtype, lin.weight.requires_grad
        (torch.uint8, False)
    """

    quant_storage = torch.uint8  # instance attribute once set; see set_quant_storage

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True,
                 dq_code: Union[str, torch.Tensor] = "fp8", device=None,
                 dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        self.quant_storage = _check_storage(quant_storage)
        # Initialise like nn.Linear, then quantize.
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.bias = None
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)
                                     .uniform_(-bound, bound))
        self._set_quantized(*quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                           double_quant=double_quant, dq_code=dq_code))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                    dq_code: Union[str, torch.Tensor] = "fp8",
                    quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        """Quantize an ``nn.Linear`` (its weight dtype is kept as the state's dtype).
        ``quant_storage``: the dtype the packed bytes are stored as (see ``set_quant_storage``).

        Example:
            >>> import torch, qlora_kernels as qk
            >>> qk.Linear4bit.from_linear(torch.nn.Linear(64, 32), quant_type="fp4").quant_type
            'fp4'
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        self.quant_storage = _check_storage(quant_storage)
        w = linear.weight.detach()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=linear.bias.requires_grad)
        self._set_quantized(*quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                           double_quant=double_quant, dq_code=dq_code))
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
        self.offset = float(state.offset) if state.offset is not None else 0.0
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
        self.quant_storage = _check_storage(dtype)
        self.weight = nn.Parameter(packed_to_storage(packed, dtype), requires_grad=False)
        return self

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> QuantState:
        """The ``QuantState`` of the weight, built from the module's buffers."""
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, shape=None, dtype=torch.float32,
                                blocksize=256, quant_type="8bit", code=self.nested_quant_map)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          dtype=self.weight_dtype, blocksize=self.blocksize,
                          quant_type=self.quant_type, code=self.quant_map,
                          offset=self.offset if self.double_quant else None, state2=state2)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight (out, in), in ``dtype`` (default: the original weight dtype).

        Example:
            >>> import torch, qlora_kernels as qk
            >>> qk.Linear4bit(64, 32).dequantize().shape
            torch.Size([32, 64])
        """
        return dequantize_4bit(self.packed_weight, self.quant_state, out_dtype=dtype)

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
        bias = None if self.bias is None else self.bias.to(cdt)
        y = torch.ops.qlora_kernels.matmul_4bit(
            x.to(cdt), self.packed_weight, self.absmax, self.quant_map, self.blocksize,
            self.out_features, self.nested_absmax, self.nested_quant_map, self.offset, bias)
        return y.to(x.dtype)

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
