"""The compute dtype of the 4-bit layers: ``resolve_compute_dtype``, the one place that says
what ``compute_dtype="auto"`` means.

Example:
    >>> import torch
    >>> from qlora_kernels.compute_dtype import resolve_compute_dtype
    >>> resolve_compute_dtype(torch.float16, "cpu"), resolve_compute_dtype(None, "cpu")
    (torch.float16, None)
"""
from __future__ import annotations

import functools
import time
from typing import Optional, Union

import torch

from .formats import FLOAT_DTYPES

AUTO = "auto"


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, which AMX-BF16 CPUs also have):
    read from the CPU's features by the extension (``cpu_dispatch.native_bf16``, which also
    honours a forced lower path); without the extension, judged once by timing.

    Example:
        >>> cpu_computes_bf16_natively() in (True, False)
        True
    """
    from . import _extension, cpu_dispatch

    if _extension.EXTENSION_LOADED:
        return cpu_dispatch.native_bf16()
    return _bf16_matmul_is_fast()


@functools.lru_cache(maxsize=None)
def _bf16_matmul_is_fast() -> bool:
    """A 256x256 matmul timed once in each dtype: emulated bf16 is several times slower
    than float32, native bf16 is not (within 1.5x)."""
    def best_of(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        a @ a  # warm-up: first-call allocation and kernel selection
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)

    return best_of(torch.bfloat16) <= 1.5 * best_of(torch.float32)


def resolve_compute_dtype(compute_dtype: Union[None, str, torch.dtype],
                          device: Union[None, str, torch.device] = None) -> Optional[torch.dtype]:
    """The dtype a 4-bit layer on ``device`` computes in. A dtype is returned as it is, None
    (the input's own dtype) too; ``"auto"``: bfloat16 on CUDA, on the CPU bfloat16 when it
    computes bf16 natively (``cpu_computes_bf16_natively``), else float32.

    Example:
        >>> resolve_compute_dtype("auto", "cuda")
        torch.bfloat16
        >>> resolve_compute_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
        True
    """
    if compute_dtype is None or isinstance(compute_dtype, torch.dtype):
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be a floating-point dtype the kernels compute "
                             f"in ({', '.join(map(str, FLOAT_DTYPES))}), None (x's own dtype) "
                             f"or 'auto', got {compute_dtype}")
        return compute_dtype
    if compute_dtype != AUTO:
        raise ValueError(f"compute_dtype must be a torch dtype, None or 'auto', got {compute_dtype!r}")
    device_type = torch.device(device if device is not None else "cpu").type
    if device_type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_computes_bf16_natively() else torch.float32
