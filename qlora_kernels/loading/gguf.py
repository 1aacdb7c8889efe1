"""GGUF files through ``from_pretrained``.

transformers' GGUF reader (``load_gguf_checkpoint``) dequantizes every tensor of the file
and returns them together, so the peak here is the whole dense model in the compute dtype
(plus the reader's float32 scratch for one tensor), not one tensor as for safetensors.
From there the tensors go through the same plan and per-tensor step as a safetensors
checkpoint, each released as it is quantized. Fine for small GGUF models (the demo's
SmolLM2-135M); stream large models from safetensors.

Example:
    >>> import qlora_kernels as qk
    >>> model = qk.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Dict

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
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model,
                                       torch_dtype=spec.compute_dtype)["tensors"]
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the GGUF tensors: {exc}") from exc
    ckpt = MemoryCheckpoint.from_tensors(path, tensors)
    del tensors
    plan = _plan(model, ckpt, False, target_modules, skip_modules)
    return _load(model, ckpt, plan, spec, progress, verbose, kwargs)
