"""Run-time CPU dispatch: the CPU's features, the path each CPU kernel takes, and the
override that forces a lower path.

The compiled kernels read the CPU's features once (csrc/cpu/cpu_isa.h) and take the best
path they have for them; ``QLORA_KERNELS_CPU_ISA`` (read at import) or ``set_cpu_isa``
caps the path, so tests can run every path the machine has. Paths, lowest first:

* ``scalar``: portable C++;
* ``avx2``: AVX2 + FMA + F16C (the baseline of every SIMD kernel);
* ``avx512``: AVX-512F/BW/VL (the 4-bit dequantize: one ``vpermw``/``vpermps`` table
  lookup per 32/16 elements; the GEMV for float32/float16 x, 64 codes per lookup; bf16 x
  keeps its AVX2 fixed-point GEMV, faster on Zen 4 than a 512-bit form of it; AdamW on
  float32 params, 16 lanes; the 8-bit blockwise encoder of quantize_8bit and the 8-bit
  AdamW states, 16 lanes);
* ``avx512_bf16``: AVX512-BF16 besides (the CPU computes bf16 natively, so the 4-bit
  GEMM runs its dense GEMM in bf16 for bf16 x instead of float32).

Asking for a path this CPU lacks raises ValueError naming the missing feature.

Example:
    >>> from qlora_kernels import cpu_dispatch
    >>> cpu_dispatch.cpu_isa() in cpu_dispatch.ISA_NAMES
    True
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from . import _extension

# Bit i of torch.ops.qlora_kernels.cpu_features() (csrc/cpu/cpu_isa.h, enum Feature).
FEATURE_NAMES = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                 "amx_bf16")
# Values of the Isa enum of csrc/cpu/cpu_isa.h, lowest first.
ISA_NAMES = ("scalar", "avx2", "avx512", "avx512_bf16")
ENV = "QLORA_KERNELS_CPU_ISA"


def cpu_features() -> List[str]:
    """The SIMD features the CPU kernels can use on this CPU (empty without the extension).

    Example:
        >>> set(cpu_features()) <= set(FEATURE_NAMES)
        True
    """
    if not _extension.EXTENSION_LOADED:
        return []
    bits = torch.ops.qlora_kernels.cpu_features()
    return [name for i, name in enumerate(FEATURE_NAMES) if bits >> i & 1]


# The path in force, read from the extension once and kept by set_cpu_isa: the GEMV/GEMM
# switch asks for it on every matmul call, where the op call cost a few microseconds.
_isa_in_force: Optional[str] = None


def cpu_isa() -> str:
    """The path the CPU kernels take now (``scalar`` without the extension).

    Example:
        >>> cpu_isa() in ISA_NAMES
        True
    """
    global _isa_in_force
    if _isa_in_force is None:
        _isa_in_force = (ISA_NAMES[torch.ops.qlora_kernels.cpu_isa()]
                         if _extension.EXTENSION_LOADED else "scalar")
    return _isa_in_force


def set_cpu_isa(isa: Optional[str] = None) -> str:
    """Cap the CPU kernels' path at ``isa`` (one of ``ISA_NAMES``; None: the best this CPU
    has) and return the path now in force. Raises ValueError for an unknown name or a path
    whose features this CPU lacks (the message names the missing feature).

    Example:
        >>> before = cpu_isa()
        >>> set_cpu_isa("scalar") if before != "scalar" else "scalar"
        'scalar'
        >>> set_cpu_isa(before) == before
        True
    """
    if isa is not None and isa not in ISA_NAMES:
        raise ValueError(f"unknown CPU path {isa!r}; expected one of {ISA_NAMES}")
    if not _extension.EXTENSION_LOADED:
        if isa not in (None, "scalar"):
            raise ValueError(f"CPU path {isa!r} needs the compiled extension, which is not loaded")
        return "scalar"
    global _isa_in_force
    try:
        level = torch.ops.qlora_kernels.set_cpu_isa(-1 if isa is None else ISA_NAMES.index(isa))
    except RuntimeError as exc:
        raise ValueError(f"CPU path {isa!r}: {str(exc).splitlines()[0]}") from None
    _isa_in_force = ISA_NAMES[level]
    return _isa_in_force


def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16, which every AMX-BF16 CPU also
    has, and no lower path forced): then bf16 GEMMs beat float32 ones and bf16 is the
    compute dtype of choice.

    Example:
        >>> isinstance(native_bf16(), bool)
        True
    """
    return cpu_isa() == "avx512_bf16"


def kernel_paths() -> Dict[str, str]:
    """The path each CPU kernel takes under the current setting.

    Example:
        >>> sorted(kernel_paths())[:2]
        ['adamw', 'dequantize_4bit']
    """
    isa = cpu_isa()
    simd = "avx2" if isa != "scalar" else "scalar"
    deq = "avx512" if ISA_NAMES.index(isa) >= ISA_NAMES.index("avx512") else simd
    gemm = "bf16 GEMM (oneDNN)" if native_bf16() else "float32 GEMM"
    gemv = simd if deq == simd else f"{deq} (float32/float16 x), {simd} (bf16 x)"
    adamw = simd if simd == "scalar" else f"{deq} (float32 params), scalar (bf16/fp16 params)"
    return {"dequantize_4bit": deq, "quantize_4bit": deq, "gemv_4bit": gemv,
            "quantize_8bit": simd, "adamw": adamw, "gemm_4bit (bf16 x)": f"{deq} dequantize + {gemm}"}


def _apply_env() -> None:
    isa = os.environ.get(ENV)
    if isa:
        try:
            set_cpu_isa(isa)
        except ValueError as exc:
            raise ValueError(f"{ENV}={isa}: {exc}") from None


_apply_env()
