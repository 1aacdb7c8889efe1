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
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .formats import NESTED_BLOCKSIZE, QUANT_TYPES, SUPPORTED_BLOCKSIZES

_PACKED_KEY = "quant_state.bitsandbytes__"
# The tensors of a state, named as bitsandbytes names them (Linear4bit's buffers too).
STATE_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_VALID_KEYS = set(STATE_TENSOR_KEYS) | {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                                   "nested_dtype", "nested_offset"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_NUMEL = 1 << 62  # far beyond any tensor; keeps block counts inside int64


def _dtype_from_name(name, key: str, allowed=_WEIGHT_DTYPES) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in allowed:
        raise ValueError(f"quant state key {key!r}: {name!r} is not one of "
                         f"{[_dtype_name(d) for d in allowed]}")
    return dtype


def _json_int(value, key: str, allowed=None) -> int:
    # JSON gives int, float (1e400 -> inf), bool, str or null: only a plain int is a count
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"quant state key {key!r}: expected an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"quant state key {key!r}: {value} is not one of {allowed}")
    return value


def _json_shape(value) -> torch.Size:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"quant state key 'shape': expected a list of sizes, got {value!r}")
    dims = [_json_int(d, "shape") for d in value]
    numel = 1
    for d in dims:
        if d < 0:
            raise ValueError(f"quant state key 'shape': negative size in {dims}")
        numel *= d
    if numel >= _MAX_NUMEL:
        raise ValueError(f"quant state key 'shape': {dims} has {numel} elements (too many)")
    return torch.Size(dims)


def _json_offset(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"quant state key 'nested_offset': expected a finite number, got "
                         f"{value!r}")
    return float(value)


def _tensor(d: dict, key: str) -> torch.Tensor:
    value = d[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"quant state key {key!r}: expected a tensor, got "
                         f"{type(value).__name__}")
    return value


def _bad_values(t: torch.Tensor, nonnegative: bool) -> Optional[str]:
    ok = torch.isfinite(t)
    if nonnegative:
        ok &= t >= 0
    if bool(ok.all()):
        return None
    i = int((~ok).nonzero()[0, 0])
    return f"holds {t.reshape(-1)[i].item()} at index {i} ({int((~ok).sum())} bad values)"


def pack_dict_to_tensor(d: dict) -> torch.Tensor:
    """A JSON-serialisable dict as a uint8 tensor of its UTF-8 JSON text."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(t: torch.Tensor) -> dict:
    """Inverse of ``pack_dict_to_tensor``; raises ValueError on bytes that are not JSON."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"quant state JSON must be a 1-D uint8 tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)}")
    try:
        d = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"quant state JSON is corrupt: {exc}") from exc
    if not isinstance(d, dict):
        raise ValueError(f"quant state JSON must be an object, got {type(d).__name__} {d!r:.40}")
    return d


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
            meta = unpack_tensor_to_dict(qs_dict.pop(key))
            if meta.get("quant_type", qt) != qt:
                raise ValueError(f"{key!r}: its JSON says quant_type {meta['quant_type']!r}")
            qs_dict.update(meta)
        elif "quant_type" not in qs_dict:
            raise ValueError("expected a packed (quant_state.bitsandbytes__*) or unpacked quant "
                             f"state, found keys {sorted(qs_dict)}")
        d = {}
        for k, v in qs_dict.items():
            short = k.split(".")[-1]
            if short in d:
                raise ValueError(f"quant state key {short!r} given twice (as {k!r})")
            d[short] = v
        unknown = set(d) - _VALID_KEYS
        if unknown:
            raise ValueError(f"unknown quant state keys: {sorted(unknown)}")
        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"quant state is missing {key!r}")
        if d["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant state key 'quant_type': {d['quant_type']!r} is not one of "
                             f"{QUANT_TYPES}")
        state2, offset = None, None
        nested_keys = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype",
                       "nested_offset")
        if any(key in d for key in nested_keys):
            for key in nested_keys:
                if key not in d:
                    raise ValueError(f"double-quantized state is missing {key!r}")
            offset = _json_offset(d["nested_offset"])
            state2 = cls(absmax=_tensor(d, "nested_absmax").to(device), shape=None,
                         dtype=_dtype_from_name(d["nested_dtype"], "nested_dtype",
                                                (torch.float32,)),
                         blocksize=_json_int(d["nested_blocksize"], "nested_blocksize",
                                             (NESTED_BLOCKSIZE,)),
                         quant_type="8bit", code=_tensor(d, "nested_quant_map").to(device))
        state = cls(absmax=_tensor(d, "absmax").to(device), shape=_json_shape(d["shape"]),
                    dtype=_dtype_from_name(d["dtype"], "dtype"),
                    blocksize=_json_int(d["blocksize"], "blocksize", SUPPORTED_BLOCKSIZES),
                    quant_type=d["quant_type"], code=_tensor(d, "quant_map").to(device),
                    offset=offset, state2=state2)
        state.validate()
        state.check_values()
        return state

    def check_values(self) -> None:
        """Check the numbers a loaded state holds (``validate`` checks only sizes and dtypes,
        cheap enough for every matmul): finite code tables, finite non-negative scales, and
        an offset that is the mean of the absmax values it was subtracted from. Raises
        ValueError naming the key.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> _, s = qk.quantize_4bit(torch.randn(64, 64))
            >>> s.state2.absmax[0] = float("nan"); s.check_values()
            Traceback (most recent call last):
            ValueError: nested_absmax: holds nan at index 0 (1 bad values)
        """
        checks = [("quant_map", self.code, False)]
        if self.nested:
            checks += [("nested_absmax", self.state2.absmax, True),
                       ("nested_quant_map", self.state2.code, False)]
        else:
            checks.append(("absmax", self.absmax, True))
        for key, t, nonnegative in checks:
            bad = _bad_values(t, nonnegative)
            if bad:
                raise ValueError(f"{key}: {bad}")
        if self.nested:
            offset = self.offset
            if offset is None or not math.isfinite(offset) or offset < 0:
                raise ValueError(f"nested_offset: {offset!r} is not a finite mean of absmax "
                                 "values (>= 0)")
            # Each nested scale is the largest |absmax - offset| of its block, and two
            # different float32 values near the offset differ by at least offset * 2^-24:
            # a smaller non-zero scale cannot come from this offset (a tampered one would
            # swallow every absmax difference, e.g. offset 1e30 with scales near 0.1).
            scales = self.state2.absmax
            floor = offset * 2.0 ** -30
            if bool(((scales > 0) & (scales < floor)).any()):
                raise ValueError(f"nested_offset: {offset!r} is inconsistent with the nested "
                                 f"scales (smallest non-zero {scales[scales > 0].min().item()})")

    def validate(self, packed: Optional[torch.Tensor] = None) -> None:
        """Check internal consistency (and against ``packed`` when given); raise
        ValueError naming the inconsistent item."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type: {self.quant_type!r} is not one of {QUANT_TYPES}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"quant_map: expected 16 float32 values, got {self.code.numel()} "
                             f"{self.code.dtype}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or \
                self.blocksize <= 0:
            raise ValueError(f"blocksize: expected a positive integer, got {self.blocksize!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape: negative size in {list(self.shape)}")
        n = self.numel
        nblocks = -(-n // self.blocksize)
        if self.absmax.numel() != nblocks:
            raise ValueError(f"absmax: {self.absmax.numel()} entries, but shape {list(self.shape)} "
                             f"at blocksize {self.blocksize} has {nblocks} blocks")
        if self.nested:
            if self.offset is None:
                raise ValueError("nested_offset: a double-quantized state needs the offset "
                                 "(the mean of the absmax values), got None")
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
