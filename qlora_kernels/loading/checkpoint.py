"""A local transformers checkpoint directory, checked before anything is loaded.

``open_checkpoint`` finds the safetensors shards (one ``model.safetensors``, or the files
named by ``model.safetensors.index.json``), reads every shard's header (keys, dtypes and
shapes; safetensors checks that the data section covers the file, so a truncated or
corrupt shard fails here) and returns a ``Checkpoint`` whose ``read(key)`` opens the shard,
reads one tensor and closes it again, so no shard is ever mapped whole.

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
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

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
    """The tensors of a checkpoint directory: where each lives, its dtype and shape."""

    directory: str
    files: List[str]
    location: Dict[str, str] = field(default_factory=dict)   # key -> shard path
    meta: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = field(default_factory=dict)

    def keys(self) -> List[str]:
        return list(self.location)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.meta[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key][0]

    def nbytes(self, key: str) -> int:
        dtype, shape = self.meta[key]
        n = 1
        for d in shape:
            n *= d
        return n * torch.empty((), dtype=dtype).element_size()

    def read(self, key: str, device="cpu") -> torch.Tensor:
        """One tensor, read from its shard (opened and closed for this read) into ordinary
        memory. safetensors hands out a private memory map of the file that outlives the
        handle: a tensor kept as is would read the file lazily (the time would show up as
        quantization) and tie the model to a file that may later be rewritten."""
        from safetensors import safe_open

        path = self.location[key]
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                mapped = f.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
        return mapped.clone() if mapped.device.type == "cpu" else mapped


def _read_header(path: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: shard file is missing")
    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                dt = sl.get_dtype()
                if dt not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dt}")
                out[key] = (_DTYPES[dt], tuple(int(d) for d in sl.get_shape()))
            return out
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
        for key, meta in _read_header(path).items():
            if key in ckpt.location:
                raise CheckpointError(f"{path}: tensor {key!r} is also stored in "
                                      f"{ckpt.location[key]}")
            if wanted is not None and wanted.get(key) != path:
                continue  # not this shard's according to the index
            ckpt.location[key] = path
            ckpt.meta[key] = meta
    if wanted is not None:
        for key, path in wanted.items():
            if key not in ckpt.location:
                raise CheckpointError(f"{path}: the index names tensor {key!r} here, but the "
                                      f"shard does not hold it")
    return ckpt
