"""GGUF files through ``from_pretrained``.

The file is memory-mapped (gguf's ``GGUFReader``) and read tensor by tensor like a
safetensors checkpoint: ``GGUFCheckpoint.read`` dequantizes one tensor to float32 with
gguf, applies transformers' per-tensor fix-ups (LLaMA's q/k row order) and hands it to the
same plan and per-tensor step, so the peak is the final model plus one dense float32
tensor (and the mapped file's pages read so far). Architectures whose transformers
processor merges several GGUF tensors into one (the MoE ones) or renames them fall back
to transformers' reader, which dequantizes the whole file at once (``MemoryCheckpoint``).

Example:
    >>> import qlora_kernels as qk
    >>> model = qk.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import torch

from .checkpoint import Checkpoint, CheckpointError


class MemoryCheckpoint(Checkpoint):
    """A checkpoint already in memory; ``read`` hands each tensor over and forgets it.

    Example:
        >>> ck = MemoryCheckpoint.from_tensors("mem", {"w": torch.ones(2)})
        >>> ck.read("w").tolist(), ck.shape("w")
        ([1.0, 1.0], (2,))
    """

    tensors: Dict[str, torch.Tensor]
    reads_into_buffer = False

    @classmethod
    def from_tensors(cls, name: str, tensors: Dict[str, torch.Tensor]) -> "MemoryCheckpoint":
        self = cls(name, [name])
        self.tensors = dict(tensors)
        for k, t in self.tensors.items():
            self.location[k] = name
            self.meta[k] = (t.dtype, tuple(t.shape))
        return self

    def read(self, key: str, device="cpu", out=None) -> torch.Tensor:
        return self.tensors.pop(key).to(device)


class GGUFCheckpoint(Checkpoint):
    """The tensors of a GGUF file under their transformers names, dequantized one at a time
    on ``read``. ``open`` returns None for an architecture whose transformers processor is
    not a plain per-tensor one (see the module docstring)."""

    reads_into_buffer = False

    @classmethod
    def open(cls, path: str, model) -> "Optional[GGUFCheckpoint]":
        from gguf import GGUFReader
        from transformers import modeling_gguf_pytorch_utils as tg

        reader = GGUFReader(path)
        arch = tg.read_field(reader, "general.architecture")[0]
        proc_cls = tg.TENSOR_PROCESSORS.get(arch, tg.TensorProcessor)
        if proc_cls not in (tg.TensorProcessor, tg.LlamaTensorProcessor):
            return None
        self = cls(path, [path])
        # the processors read head counts under their transformers names: the model's config
        self.processor = proc_cls(config=model.config.to_dict())
        self.by_key = {}
        names = tg.get_gguf_hf_weights_map(model, self.processor)
        for t in reader.tensors:
            key = names.get(t.name)
            if key is None:
                continue  # transformers skips these too
            self.by_key[key] = t
            self.location[key] = path
            self.meta[key] = (torch.float32, tuple(int(d) for d in reversed(t.shape.tolist())))
        return self

    def read(self, key: str, device="cpu", out=None) -> torch.Tensor:
        from gguf import dequantize

        t = self.by_key[key]
        try:
            w = dequantize(t.data, t.tensor_type)
            w = self.processor.process(weights=w, name=t.name).weights
        except Exception as exc:
            raise CheckpointError(f"{self.directory}: cannot dequantize tensor {t.name!r} "
                                  f"({key!r}): {exc}") from exc
        w = np.ascontiguousarray(w, dtype=np.float32).reshape(self.shape(key))
        if not w.flags.writeable:  # a float32 tensor is a view of the memory-mapped file
            w = w.copy()
        return torch.from_numpy(w).to(device)


def from_gguf(path: str, *, compute_dtype="auto", device="cpu", **kwargs):
    """``from_pretrained`` for a ``.gguf`` file (see the module docstring for its peak)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from .stream import _build_empty, _load, _plan, QuantSpec, resolve_compute_dtype

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    directory, name = os.path.split(os.path.abspath(path))
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception as exc:  # the GGUF reader raises many types on a bad file
        raise CheckpointError(f"{path}: not a readable GGUF model: {exc}") from exc
    progress, verbose = kwargs.pop("progress"), kwargs.pop("verbose")
    spec = QuantSpec(kwargs.pop("quant_type"), kwargs.pop("blocksize"), kwargs.pop("double_quant"),
                     kwargs.pop("dq_code"), resolve_compute_dtype(compute_dtype, device),
                     device)
    target_modules, skip_modules = kwargs.pop("target_modules"), kwargs.pop("skip_modules")
    model = _build_empty(config, path, spec.compute_dtype)
    try:
        ckpt = GGUFCheckpoint.open(path, model)
        if ckpt is None:
            tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model,
                                           torch_dtype=spec.compute_dtype)["tensors"]
            ckpt = MemoryCheckpoint.from_tensors(path, tensors)
            del tensors
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the GGUF tensors: {exc}") from exc
    plan = _plan(model, ckpt, False, target_modules, skip_modules)
    return _load(model, ckpt, plan, spec, progress, verbose, kwargs)
