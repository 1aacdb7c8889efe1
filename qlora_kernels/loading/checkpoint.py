"""A local transformers checkpoint directory, checked before anything is loaded.

``open_checkpoint`` finds the safetensors shards (one ``model.safetensors``, or the files
named by ``model.safetensors.index.json``), reads every shard's header (keys, dtypes,
shapes and byte ranges; safetensors checks that the data section covers the file, so a
truncated or corrupt shard fails here) and returns a ``Checkpoint`` whose ``read(key)``
reads that one tensor's bytes with ``os.preadv`` into ordinary memory (a new tensor, or a
buffer the caller reuses), so no shard is ever mapped and the GIL is free while the disk
works.

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp(); save_file({"w": torch.ones(2, 3)}, os.path.join(d, "model.safetensors"))
    >>> ckpt = open_checkpoint(d)
    >>> ckpt.shape("w"), ckpt.read("w").sum().item()
    ((2, 3), 6.0)
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")

# safetensors' dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file (and key)."""


@dataclass
class Checkpoint:
    """The tensors of a checkpoint directory: where each lives, its dtype and shape, and
    its bytes' offset in its shard."""

    directory: str
    files: List[str]
    location: Dict[str, str] = field(default_factory=dict)   # key -> shard path
    meta: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = field(default_factory=dict)
    offset: Dict[str, int] = field(default_factory=dict)     # key -> first byte in its shard
    reads_into_buffer = True  # read(out=...) fills the caller's buffer (subclasses may not)

    def keys(self) -> List[str]:
        return list(self.location)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.meta[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key][0]

    def nbytes(self, key: str) -> int:
        dtype, shape = self.meta[key]
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def read(self, key: str, device="cpu", out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One tensor, read from its shard into ordinary CPU memory (a new tensor, or the
        start of ``out``, a uint8 buffer of at least ``nbytes(key)`` that the caller reuses
        from tensor to tensor), then moved to ``device``. Not a memory map: a mapped tensor
        kept as is would read the file lazily and tie the model to a file that may later be
        rewritten."""
        path = self.location[key]
        dtype, shape = self.meta[key]
        n = self.nbytes(key)
        if out is None:
            out = torch.empty(n, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.device.type != "cpu" or out.numel() < n \
                or not out.is_contiguous():
            raise ValueError(f"read({key!r}): out must be a contiguous CPU uint8 buffer of at "
                             f"least {n} bytes")
        buf = out[:n]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
        try:
            view, done = memoryview(buf.numpy()), 0
            while done < n:
                got = os.preadv(fd, [view[done:]], self.offset[key] + done)
                if got <= 0:
                    raise CheckpointError(f"{path}: tensor {key!r} ends past the end of the "
                                          f"file (truncated while loading?)")
                done += got
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
        finally:
            os.close(fd)
        # safetensors stores little-endian; a big-endian host would need a byte swap here
        tensor = buf.view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)
        return tensor if torch.device(device).type == "cpu" else tensor.to(device)


def _data_offsets(path: str) -> Dict[str, int]:
    """Absolute file offset of each tensor's bytes: the 8-byte little-endian header length,
    the JSON header, then the data section the header's ``data_offsets`` index."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    return {k: 8 + hlen + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _read_header(path: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...], int]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: shard file is missing")
    try:
        # safetensors validates the header (offsets contiguous and inside the file) first
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                dt = sl.get_dtype()
                if dt not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dt}")
                out[key] = (_DTYPES[dt], tuple(int(d) for d in sl.get_shape()))
        offsets = _data_offsets(path)
        return {k: (*meta, offsets[k]) for k, meta in out.items()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors' own error types: truncated or corrupt file
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                              f"corrupt?): {exc}") from exc


def open_checkpoint(directory: str) -> Checkpoint:
    """Find and check every shard of a transformers checkpoint directory.

    Raises ``CheckpointError`` (a ValueError) naming the file: no safetensors weights (a
    ``.bin``-only checkpoint is refused: it is a pickle, and converting it needs the whole
    file in memory), an index naming a missing shard or a key its shard lacks, a truncated
    or corrupt shard, a key stored twice.

    Example:
        >>> open_checkpoint("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        CheckpointError: /nonexistent: not a directory
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    index_path = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a safetensors index ({exc})") from exc
        files = sorted(set(weight_map.values()))
        wanted = {k: os.path.join(directory, v) for k, v in weight_map.items()}
    elif os.path.isfile(single):
        files, wanted = [SINGLE_FILE], None
    else:
        pickles = [p for p in _PICKLE_FILES if os.path.exists(os.path.join(directory, p))]
        if pickles:
            raise CheckpointError(
                f"{directory}: only {pickles[0]} (a pickle checkpoint) found; qlora_kernels "
                f"streams safetensors only. Convert it once, e.g. transformers' "
                f"model.save_pretrained(dir, safe_serialization=True)")
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")
    ckpt = Checkpoint(directory, [os.path.join(directory, f) for f in files])
    for path in ckpt.files:
        for key, (dtype, shape, offset) in _read_header(path).items():
            if key in ckpt.location:
                raise CheckpointError(f"{path}: tensor {key!r} is also stored in "
                                      f"{ckpt.location[key]}")
            if wanted is not None and wanted.get(key) != path:
                continue  # not this shard's according to the index
            ckpt.location[key] = path
            ckpt.meta[key] = (dtype, shape)
            ckpt.offset[key] = offset
    if wanted is not None:
        for key, path in wanted.items():
            if key not in ckpt.location:
                raise CheckpointError(f"{path}: the index names tensor {key!r} here, but the "
                                      f"shard does not hold it")
    return ckpt
