"""The ``torch.ops.qlora_kernels`` ops: fake (meta) kernels, and fallbacks.

csrc/ops.cpp declares every schema in one ``TORCH_LIBRARY`` block and the compiled
kernels register per device. This module adds what Python owns:

* ``register_fake`` kernels, so the ops trace under ``torch.compile`` and FakeTensor;
* when the extension is missing, the same schemas (``SCHEMAS`` below; a test checks they
  match the C++ ones) with the PyTorch reference as their implementation;
* on CUDA devices without compiled CUDA kernels, the Triton kernels (or the reference).

Example:
    >>> import torch, qlora_kernels
    >>> packed, absmax = torch.ops.qlora_kernels.quantize_4bit(torch.randn(64), 64, "nf4")
    >>> packed.shape
    torch.Size([32, 1])
"""
from __future__ import annotations

import torch

from . import _extension
from .backends import torch as reference  # the submodule, not the torch package
from .optim import reference as optim_reference

# Mirrors csrc/ops.cpp (tests/test_ops.py compares them when the extension is loaded).
SCHEMAS = {
    "quantize_4bit": "quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        "dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, int numel, "
        "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0) -> Tensor"
    ),
    "dequantize_4bit_out": (
        "dequantize_4bit_out(Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "Tensor? nested_absmax, Tensor? nested_code, float offset, Tensor(a!) out) -> ()"
    ),
    "dequantize_4bit_cols_out": (
        "dequantize_4bit_cols_out(Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "Tensor? nested_absmax, Tensor? nested_code, float offset, int row_len, int col0, "
        "Tensor(a!) out) -> ()"
    ),
    "quantize_8bit": "quantize_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_8bit": (
        "dequantize_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) "
        "-> Tensor"
    ),
    "gemv_4bit": (
        "gemv_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "int out_features, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0, Tensor? bias=None) -> Tensor"
    ),
    # implemented in Python by qlora_kernels/matmul.py, whatever the build
    "matmul_4bit": (
        "matmul_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "int out_features, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0, Tensor? bias=None) -> Tensor"
    ),
    "matmul_4bit_backward": (
        "matmul_4bit_backward(Tensor grad_y, Tensor packed, Tensor absmax, Tensor code, "
        "int blocksize, int in_features, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0) -> Tensor"
    ),
    "adamw_step_": (
        "adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
        "bool maximize) -> ()"
    ),
    "adamw_step_multi_": (
        "adamw_step_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, bool maximize) -> ()"
    ),
    "adamw8bit_step_": (
        "adamw8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) qm, Tensor(c!) absmax_m, "
        "Tensor(d!) qv, Tensor(e!) absmax_v, Tensor code_m, Tensor code_v, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, int step, bool maximize) -> ()"
    ),
    "managed_supported": "managed_supported(int device) -> bool",
    "managed_empty": "managed_empty(int[] size, ScalarType dtype, int device) -> Tensor",
    "managed_prefetch_": "managed_prefetch_(Tensor(a!)[] tensors, int device) -> ()",
    "is_managed": "is_managed(Tensor t) -> bool",
    "cpu_features": "cpu_features() -> int",
    "set_cpu_isa": "set_cpu_isa(int isa) -> int",
    "cpu_isa": "cpu_isa() -> int",
}


def _dequantize_4bit_cols_out_reference(packed, absmax, code, blocksize, nested_absmax,
                                        nested_code, offset, row_len, col0, out):
    rows, cols = out.shape
    w = reference.dequantize_4bit(packed, absmax, code, blocksize, rows * row_len, out.dtype,
                                  nested_absmax, nested_code, offset)
    out.copy_(w.view(rows, row_len)[:, col0:col0 + cols])


def _set_cpu_isa_reference(isa):
    if isa > 0:
        raise RuntimeError("set_cpu_isa: the compiled extension is not loaded (scalar only)")
    return 0

# Ops with a reference implementation that can stand in for a missing kernel.
_REFERENCE_IMPLS = {
    "quantize_4bit": reference.quantize_4bit,
    "dequantize_4bit": reference.dequantize_4bit,
    "dequantize_4bit_out": reference.dequantize_4bit_out,
    "dequantize_4bit_cols_out": _dequantize_4bit_cols_out_reference,
    "quantize_8bit": reference.quantize_8bit,
    "dequantize_8bit": reference.dequantize_8bit,
    "gemv_4bit": reference.gemv_4bit,
    "adamw_step_": optim_reference.adamw_step_,
    "adamw_step_multi_": optim_reference.adamw_step_multi_,
    "adamw8bit_step_": optim_reference.adamw8bit_step_,
    "managed_supported": optim_reference.managed_supported,
    "managed_empty": optim_reference.managed_empty,
    "managed_prefetch_": optim_reference.managed_prefetch_,
    "is_managed": optim_reference.is_managed,
    # without the extension: no SIMD feature, the scalar (reference) path only
    "cpu_features": lambda: 0,
    "set_cpu_isa": _set_cpu_isa_reference,
    "cpu_isa": lambda: 0,
}
# Ops whose compiled kernels exist only in CUDA builds (csrc/cuda/managed_memory.cpp, which
# registers them for every device); a CPU-only build gets the reference "nothing is managed".
_MANAGED_OPS = ("managed_supported", "managed_empty", "managed_prefetch_", "is_managed")
# Device-less ops of the CPU dispatch (csrc/ops.cpp registers them for every key).
_CPU_DISPATCH_OPS = ("cpu_features", "set_cpu_isa", "cpu_isa")

_fallback_lib = None
_managed_lib = None


def _register_fallbacks() -> None:
    global _fallback_lib
    if not _extension.EXTENSION_LOADED:
        _fallback_lib = torch.library.Library("qlora_kernels", "DEF")
        for name, schema in SCHEMAS.items():
            _fallback_lib.define(schema)
            if name in _REFERENCE_IMPLS:
                _fallback_lib.impl(name, _REFERENCE_IMPLS[name], "CompositeExplicitAutograd")
        return
    if not _extension.has_kernel("managed_supported", "CompositeExplicitAutograd"):
        global _managed_lib
        _managed_lib = torch.library.Library("qlora_kernels", "IMPL")
        for name in _MANAGED_OPS:
            _managed_lib.impl(name, _REFERENCE_IMPLS[name], "CompositeExplicitAutograd")
    # Extension loaded: CUDA tensors still need a kernel when it was built without CUDA.
    if torch.version.cuda is None:
        return
    impl_lib = torch.library.Library("qlora_kernels", "IMPL")
    try:
        from .backends import triton as triton_backend
    except Exception:  # triton missing or broken: the reference keeps CUDA tensors working
        triton_backend = None
    for name, ref_fn in _REFERENCE_IMPLS.items():
        if name in _MANAGED_OPS or name in _CPU_DISPATCH_OPS:
            continue
        if not _extension.has_kernel(name, "CUDA"):
            fn = getattr(triton_backend, name, None) if triton_backend is not None else None
            impl_lib.impl(name, fn or ref_fn, "CUDA")
    _fallback_lib = impl_lib


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
