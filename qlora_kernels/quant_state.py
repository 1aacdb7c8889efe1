"""QuantState: everything needed to dequantize a packed 4-bit tensor.

Field names and the dict layout follow bitsandbytes (shared/FORMAT.md), so a
``state_dict`` written by bitsandbytes loads here and ours loads there.

Example:
    >>> import torch, qlora_kernels as qk
    >>> packed, state = qk.quantize_4bit(torch.randn(128, 64))
    >>> sorted(state.as_dict())[:2]
    ['absmax', 'nested_absmax']
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from .formats import NESTED_BLOCKSIZE, QUANT_TYPES

_PACKED_KEY = "quant_state.bitsandbytes__"
# The tensors of a state, named as bitsandbytes names them (Linear4bit's buffers too).
STATE_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_VALID_KEYS = set(STATE_TENSOR_KEYS) | {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                                   "nested_dtype", "nested_offset"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant state key {key!r}: {name!r} is not a torch dtype")
    return dtype


def pack_dict_to_tensor(d: dict) -> torch.Tensor:
    """A JSON-serialisable dict as a uint8 tensor of its UTF-8 JSON text."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(t: torch.Tensor) -> dict:
    """Inverse of ``pack_dict_to_tensor``; raises ValueError on bytes that are not JSON."""
    try:
        return json.loads(bytes(t.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"quant state JSON is corrupt: {exc}") from exc


@dataclass(eq=False)
class QuantState:
    """State of a packed 4-bit tensor; with double quantization, ``state2`` holds the
    8-bit code and float32 scales of the absmax, and ``offset`` their mean.

    Example:
        >>> import torch, qlora_kernels as qk
        >>> _, s = qk.quantize_4bit(torch.randn(64, 64), double_quant=False)
        >>> s.nested, s.absmax.dtype
        (False, torch.float32)
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: Optional[float] = None
    state2: Optional["QuantState"] = None

    def __post_init__(self):
        if self.shape is not None:
            self.shape = torch.Size(self.shape)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def to(self, device) -> "QuantState":
        """A copy on ``device`` (the tables and scales move with it)."""
        return QuantState(
            absmax=self.absmax.to(device), shape=self.shape, dtype=self.dtype,
            blocksize=self.blocksize, quant_type=self.quant_type, code=self.code.to(device),
            offset=self.offset, state2=None if self.state2 is None else self.state2.to(device))

    def op_args(self) -> tuple:
        """``(absmax, code, blocksize, nested_absmax, nested_code, offset)``: the state as the
        arguments of the ``qlora_kernels`` 4-bit ops. Without double quantization the nested
        tables are None and the offset 0.0 (the ops' float argument); in the state itself
        "no offset" is ``offset=None``.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> _, s = qk.quantize_4bit(torch.randn(64), double_quant=False)
            >>> s.op_args()[2:]
            (64, None, None, 0.0)
        """
        s2 = self.state2
        if s2 is None:
            return self.absmax, self.code, self.blocksize, None, None, 0.0
        return self.absmax, self.code, self.blocksize, s2.absmax, s2.code, float(self.offset)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        same_meta = (self.shape == other.shape and self.dtype == other.dtype
                     and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                     and self.offset == other.offset and self.nested == other.nested)
        return bool(same_meta and self.absmax.dtype == other.absmax.dtype
                    and torch.equal(self.absmax.cpu(), other.absmax.cpu())
                    and torch.equal(self.code.cpu(), other.code.cpu())
                    and (not self.nested or self.state2 == other.state2))

    __hash__ = None

    # --------------------------------------------------------------- dict interop
    def as_dict(self, packed: bool = True) -> dict:
        """The state as bitsandbytes lays it out. ``packed=True`` (default, the form saved
        in checkpoints) gives tensors only, the non-tensor items as UTF-8 JSON under
        ``quant_state.bitsandbytes__<quant_type>``; ``packed=False`` gives them as values.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> _, s = qk.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
            >>> "quant_state.bitsandbytes__nf4" in s.as_dict()
            True
        """
        d = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": int(self.blocksize),
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": int(self.state2.blocksize),
                "nested_quant_map": self.state2.code,
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": float(self.offset),
            })
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        out[_PACKED_KEY + self.quant_type] = pack_dict_to_tensor(
            {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)})
        return out

    @classmethod
    def from_dict(cls, qs_dict: dict, device="cpu") -> "QuantState":
        """Rebuild a state from ``as_dict`` output (packed or not), keys optionally
        prefixed (``weight.absmax`` ...), e.g. as bitsandbytes writes them.

        Raises ValueError naming the key on anything missing, unknown or inconsistent.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> _, s = qk.quantize_4bit(torch.randn(64, 64))
            >>> qk.QuantState.from_dict(s.as_dict()) == s
            True
        """
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items()
                       if "quant_state." in k and isinstance(v, torch.Tensor)]
        if len(packed_keys) > 1:
            raise ValueError(f"more than one packed quant state: {packed_keys}")
        if packed_keys:
            key = packed_keys[0]
            qt = key.rsplit("bitsandbytes__", 1)[-1]
            if qt not in QUANT_TYPES:
                raise ValueError(f"{key!r}: unknown quant type {qt!r}")
            qs_dict.update(unpack_tensor_to_dict(qs_dict.pop(key)))
        elif "quant_type" not in qs_dict:
            raise ValueError("expected a packed (quant_state.bitsandbytes__*) or unpacked quant "
                             f"state, found keys {sorted(qs_dict)}")
        d = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(d) - _VALID_KEYS
        if unknown:
            raise ValueError(f"unknown quant state keys: {sorted(unknown)}")
        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"quant state is missing {key!r}")
        state2, offset = None, None
        if "nested_absmax" in d:
            for key in ("nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"):
                if key not in d:
                    raise ValueError(f"double-quantized state is missing {key!r}")
            offset = float(d["nested_offset"])
            state2 = cls(absmax=d["nested_absmax"].to(device), shape=None,
                         dtype=_dtype_from_name(d["nested_dtype"], "nested_dtype"),
                         blocksize=int(d["nested_blocksize"]), quant_type="8bit",
                         code=d["nested_quant_map"].to(device))
        state = cls(absmax=d["absmax"].to(device), shape=torch.Size(d["shape"]),
                    dtype=_dtype_from_name(d["dtype"], "dtype"), blocksize=int(d["blocksize"]),
                    quant_type=str(d["quant_type"]), code=d["quant_map"].to(device),
                    offset=offset, state2=state2)
        state.validate()
        return state

    def validate(self, packed: Optional[torch.Tensor] = None) -> None:
        """Check internal consistency (and against ``packed`` when given); raise
        ValueError naming the inconsistent item."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type: {self.quant_type!r} is not one of {QUANT_TYPES}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"quant_map: expected 16 float32 values, got {self.code.numel()} "
                             f"{self.code.dtype}")
        n = self.numel
        nblocks = -(-n // self.blocksize)
        if self.absmax.numel() != nblocks:
            raise ValueError(f"absmax: {self.absmax.numel()} entries, but shape {list(self.shape)} "
                             f"at blocksize {self.blocksize} has {nblocks} blocks")
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"absmax: a double-quantized absmax is uint8, got {self.absmax.dtype}")
            if self.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize: only {NESTED_BLOCKSIZE} is supported, "
                                 f"got {self.state2.blocksize}")
            n2 = -(-nblocks // NESTED_BLOCKSIZE)
            if self.state2.absmax.dtype != torch.float32 or self.state2.absmax.numel() != n2:
                raise ValueError(f"nested_absmax: expected {n2} float32 values, got "
                                 f"{self.state2.absmax.numel()} {self.state2.absmax.dtype}")
            if self.state2.code.dtype != torch.float32 or self.state2.code.numel() != 256:
                raise ValueError("nested_quant_map: expected 256 float32 values, got "
                                 f"{self.state2.code.numel()} {self.state2.code.dtype}")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax: expected float32, got {self.absmax.dtype}")
        if packed is not None:
            if packed.dtype != torch.uint8:
                raise ValueError(f"packed weight: expected uint8, got {packed.dtype}")
            if packed.numel() != (n + 1) // 2:
                raise ValueError(f"packed weight holds {packed.numel()} bytes but the state's shape "
                                 f"{list(self.shape)} needs {(n + 1) // 2}")
