"""The ``torch.ops.qlora_kernels`` ops: fake (meta) kernels, and fallbacks.

qlora_kernels/op_schemas.inc declares every schema once (csrc/ops.cpp includes it in its
``TORCH_LIBRARY`` block); the compiled kernels register per device. This module adds what
Python owns:

* ``register_fake`` kernels, so the ops trace under ``torch.compile`` and FakeTensor;
* when the extension is missing, the same schemas (read from op_schemas.inc, the file
  csrc/ops.cpp includes) with the PyTorch reference as their implementation;
* on CUDA devices without compiled CUDA kernels, the Triton kernels (or the reference);
  also in place of the compiled ones when they have no image for the GPU
  (``replace_cuda_kernels``, called by the probe in ``_extension.cuda_kernels_runnable``).

Overrides (``qk.use_backend``) are registered by qlora_kernels/backends/__init__.py.

Example:
    >>> import torch, qlora_kernels
    >>> packed, absmax = torch.ops.qlora_kernels.quantize_4bit(torch.randn(64), 64, "nf4")
    >>> packed.shape
    torch.Size([32, 1])
"""
from __future__ import annotations

import os
import re

import torch

from . import _extension
from .backends import reference

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "op_schemas.inc")


def read_schemas(path: str = SCHEMA_FILE) -> dict:
    """op name -> schema, from the ``QK_OP("...")`` entries of op_schemas.inc (the one
    declaration, which csrc/ops.cpp includes); adjacent string literals are joined as C++
    joins them.

    Example:
        >>> read_schemas()["is_managed"]
        'is_managed(Tensor t) -> bool'
    """
    with open(path, encoding="utf-8") as f:
        text = "\n".join(line.split("//", 1)[0] for line in f)
    schemas = {}
    for entry in re.findall(r'QK_OP\(((?:\s*"[^"]*")+)\s*\)', text):
        schema = "".join(re.findall(r'"([^"]*)"', entry))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


SCHEMAS = read_schemas()

_fallback_lib = None  # without the extension: the schemas and their reference kernels
_managed_lib = None
# Python kernels for CUDA tensors where no compiled CUDA kernel serves an op. torch 2.11
# refuses a second Python registration for the same op and key (later versions override
# with a warning), so a backend override lifts these first and puts them back after.
_stand_in_lib = None
_stand_in_names: tuple = ()


def _register_fallbacks() -> None:
    """The default registrations Python owns (backends/__init__.py explains the routing)."""
    global _fallback_lib, _managed_lib
    reference_impls = reference.fallback_impls()
    if not _extension.EXTENSION_LOADED:
        _fallback_lib = torch.library.Library("qlora_kernels", "DEF")
        for name, schema in SCHEMAS.items():
            _fallback_lib.define(schema)
            if name in reference_impls:
                _fallback_lib.impl(name, reference_impls[name], "CompositeExplicitAutograd")
        return
    # The managed-memory kernels exist only in CUDA builds (csrc/cuda/managed_memory.cpp
    # registers them for every device); a CPU-only build gets the reference "nothing is managed".
    if not _extension.has_kernel("managed_supported", "CompositeExplicitAutograd"):
        _managed_lib = torch.library.Library("qlora_kernels", "IMPL")
        for name in reference.MANAGED_OPS:
            _managed_lib.impl(name, reference_impls[name], "CompositeExplicitAutograd")
    # Extension loaded: CUDA tensors still need a kernel when it was built without CUDA.
    if torch.version.cuda is None:
        return
    _set_cuda_stand_ins([name for name in reference_impls
                         if name not in reference.DEVICELESS_OPS
                         and not _extension.has_kernel(name, "CUDA")])


def _set_cuda_stand_ins(names) -> None:
    """Registers the Triton kernel, else the reference, as the CUDA kernel of each op in
    ``names`` (replacing the previous stand-ins)."""
    global _stand_in_names
    suspend_cuda_stand_ins()
    _stand_in_names = tuple(names)
    resume_cuda_stand_ins()


def suspend_cuda_stand_ins() -> None:
    """Lift the CUDA stand-in registrations (a backend override replaces them meanwhile).

    Example:
        >>> suspend_cuda_stand_ins(); resume_cuda_stand_ins()
    """
    global _stand_in_lib
    if _stand_in_lib is not None:
        _stand_in_lib._destroy()
        _stand_in_lib = None


def resume_cuda_stand_ins() -> None:
    """Register the CUDA stand-ins again (idempotent; not while an override replaces them)."""
    global _stand_in_lib
    from .backends import overriding
    if _stand_in_lib is not None or not _stand_in_names or overriding():
        return
    reference_impls = reference.fallback_impls()
    try:
        from .backends import triton as triton_backend
        stand_ins = triton_backend.stand_in_impls()
    except Exception:  # triton missing or broken: the reference keeps CUDA tensors working
        stand_ins = {}
    lib = torch.library.Library("qlora_kernels", "IMPL")
    for name in _stand_in_names:
        lib.impl(name, stand_ins.get(name, reference_impls[name]), "CUDA")
    _stand_in_lib = lib


def replace_cuda_kernels() -> None:
    """Route every kernel op on CUDA tensors to Triton (or the reference), overriding the
    compiled CUDA kernels: for a GPU they have no image for (built for other archs without
    PTX it can run). Idempotent.

    Example (it overrides kernels for the whole process, so it is not run here):
        >>> from qlora_kernels import ops
        >>> ops.replace_cuda_kernels()  # doctest: +SKIP
    """
    names = tuple(n for n in reference.fallback_impls() if n not in reference.DEVICELESS_OPS)
    if _stand_in_names != names:
        _set_cuda_stand_ins(names)


_register_fallbacks()


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("qlora_kernels::quantize_4bit")
def _quantize_4bit_fake(A, blocksize, quant_type):
    n = A.numel()
    return (A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            A.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.register_fake("qlora_kernels::dequantize_4bit")
def _dequantize_4bit_fake(packed, absmax, code, blocksize, numel, dtype,
                          nested_absmax=None, nested_code=None, offset=0.0):
    torch._check(packed.numel() == (numel + 1) // 2, lambda: "packed does not match numel")
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.register_fake("qlora_kernels::dequantize_4bit_out")
def _dequantize_4bit_out_fake(packed, absmax, code, blocksize, nested_absmax, nested_code, offset,
                              out):
    return None


@torch.library.register_fake("qlora_kernels::dequantize_4bit_cols_out")
def _dequantize_4bit_cols_out_fake(packed, absmax, code, blocksize, nested_absmax, nested_code,
                                   offset, row_len, col0, out):
    return None


@torch.library.register_fake("qlora_kernels::gemv_4bit")
def _gemv_4bit_fake(x, packed, absmax, code, blocksize, out_features, nested_absmax=None,
                    nested_code=None, offset=0.0, bias=None):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("qlora_kernels::quantize_8bit")
def _quantize_8bit_fake(A, code, blocksize):
    n = A.numel()
    return (A.new_empty((n,), dtype=torch.uint8),
            A.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.register_fake("qlora_kernels::dequantize_8bit")
def _dequantize_8bit_fake(q, absmax, code, blocksize, dtype):
    return q.new_empty((q.numel(),), dtype=dtype)


@torch.library.register_fake("qlora_kernels::dropout_seeded")
def _dropout_seeded_fake(x, seed, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qlora_kernels::adamw_step_")
def _adamw_step_fake(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                     maximize):
    return None


@torch.library.register_fake("qlora_kernels::adamw_step_multi_")
def _adamw_step_multi_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2,
                           eps, weight_decay, maximize):
    return None


@torch.library.register_fake("qlora_kernels::adamw8bit_step_")
def _adamw8bit_step_fake(param, grad, qm, absmax_m, qv, absmax_v, code_m, code_v, lr, beta1,
                         beta2, eps, weight_decay, step, maximize):
    return None


@torch.library.register_fake("qlora_kernels::managed_empty")
def _managed_empty_fake(size, dtype, device):
    return torch.empty(size, dtype=dtype, device=torch.device("cuda", device))


@torch.library.register_fake("qlora_kernels::managed_prefetch_")
def _managed_prefetch_fake(tensors, device):
    return None


@torch.library.register_fake("qlora_kernels::is_managed")
def _is_managed_fake(t):
    return False
