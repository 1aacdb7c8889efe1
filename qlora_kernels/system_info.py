"""``qk.info()`` / ``qlora-kernels info``: what this machine runs: the CPU and its
features, the path each CPU kernel takes, the compute dtype ``"auto"`` stands for, and the
GEMV/GEMM row thresholds in force.

Example:
    >>> import io, qlora_kernels as qk
    >>> sorted(qk.info(file=io.StringIO()))
    ['auto_compute_dtype', 'cpu', 'cpu_features', 'cpu_isa', 'extension_loaded', 'gemv_max_rows', 'kernel_paths']
"""
from __future__ import annotations

import platform
import sys
from typing import Dict

import torch

from . import _extension, cpu_dispatch, matmul
from .compute_dtype import resolve_compute_dtype


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info(file=None) -> Dict[str, object]:
    """Print (to ``file``, default stdout) and return what this machine runs.

    Example:
        >>> import io, qlora_kernels as qk
        >>> qk.info(file=io.StringIO())["cpu_isa"] in qk.cpu_dispatch.ISA_NAMES
        True
    """
    rows = {dt: matmul.gemv_max_rows("cpu", dt) for dt in (torch.float32, torch.bfloat16,
                                                             torch.float16)}
    result = {
        "cpu": _cpu_model(),
        "extension_loaded": _extension.EXTENSION_LOADED,
        "cpu_features": cpu_dispatch.cpu_features(),
        "cpu_isa": cpu_dispatch.cpu_isa(),
        "kernel_paths": cpu_dispatch.kernel_paths(),
        "auto_compute_dtype": str(resolve_compute_dtype("auto", "cpu")).removeprefix("torch."),
        "gemv_max_rows": {str(dt).removeprefix("torch."): r for dt, r in rows.items()},
    }
    out = file or sys.stdout
    print(f"cpu: {result['cpu']}", file=out)
    print(f"compiled extension: {'loaded' if result['extension_loaded'] else 'not loaded'}",
          file=out)
    print(f"cpu features: {' '.join(result['cpu_features']) or '(none used)'}", file=out)
    print(f"cpu path in force: {result['cpu_isa']} (override: {cpu_dispatch.ENV})", file=out)
    for name, path in result["kernel_paths"].items():
        print(f"  {name}: {path}", file=out)
    print(f"compute dtype 'auto' on the cpu: {result['auto_compute_dtype']}", file=out)
    print("GEMV up to this many rows of x, GEMM above: " + ", ".join(
        f"{dt} {r}" for dt, r in result["gemv_max_rows"].items()), file=out)
    return result
