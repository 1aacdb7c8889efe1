"""``qk.info()`` / ``qlora-kernels info``: what this machine runs: the CPU and its
features, the path each CPU kernel takes, the compute dtype ``"auto"`` stands for, and the
GEMV/GEMM row thresholds in force with where each comes from (``matmul.gemv_threshold``).

Example:
    >>> import io, qlora_kernels as qk
    >>> sorted(qk.info(file=io.StringIO()))
    ['auto_compute_dtype', 'cpu', 'cpu_features', 'cpu_isa', 'extension_loaded', 'gemv_max_rows', 'gemv_max_rows_source', 'kernel_paths']
"""
from __future__ import annotations

import platform
import sys
from typing import Dict

import torch

from . import _extension, cpu_dispatch, gemv_calibration, matmul
from .compute_dtype import resolve_compute_dtype


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows).

    Example:
        >>> isinstance(cpu_model(), str)
        True
    """
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
    rows = {str(dt).removeprefix("torch."): matmul.gemv_threshold("cpu", dt)
            for dt in (torch.float32, torch.bfloat16, torch.float16)}
    result = {
        "cpu": cpu_model(),
        "extension_loaded": _extension.EXTENSION_LOADED,
        "cpu_features": cpu_dispatch.cpu_features(),
        "cpu_isa": cpu_dispatch.cpu_isa(),
        "kernel_paths": cpu_dispatch.kernel_paths(),
        "auto_compute_dtype": str(resolve_compute_dtype("auto", "cpu")).removeprefix("torch."),
        "gemv_max_rows": {dt: r for dt, (r, _) in rows.items()},
        "gemv_max_rows_source": {dt: source for dt, (_, source) in rows.items()},
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
    print(f"GEMV up to this many rows of x, GEMM above (cpu, path {result['cpu_isa']}, "
          f"{torch.get_num_threads()} threads):", file=out)
    for dt, (r, source) in rows.items():
        print(f"  {dt}: {r} ({source})", file=out)
    if result["extension_loaded"] and "features rule" in result["gemv_max_rows_source"].values():
        print("  (features rule: not calibrated for this CPU path and thread count yet; "
              "`qlora-kernels calibrate` measures it, as does the first CPU matmul with 2 to "
              f"128 rows unless {gemv_calibration.ENV_CALIBRATE}=0)", file=out)
    return result
