"""This machine's GEMV/GEMM switch on the CPU: measured once per dtype of x, cached per CPU.

``matmul_4bit`` takes the fused GEMV for x with few rows and the dequantize + dense GEMM
above a threshold. Where the two cross depends on the CPU (SIMD path, native bf16, cache
sizes) and on the threads, so a rule from the CPU's features is only a first guess. The
calibration times both paths (the same functions ``matmul_4bit`` calls for each) on an
NF4 + double-quant ``SHAPE`` weight at 1, 2, 4, ..., 128 rows of float32, bfloat16 and
float16 x, round-robin, and keeps the largest row count at which the GEMV was faster
(``pick_threshold``; it stops once the GEMM has won twice in a row). Each path's time is
its fastest of ``ROUNDS`` calls: other work on the machine only ever adds time, and a
median of 5 still moved with it (benchmarks/README.md, GEMV/GEMM threshold).

When: automatically, once per setting (the CPU path in force and torch's thread count),
the first time a CPU ``matmul_4bit`` with 2 to 128 rows runs with the compiled extension,
no backend override, no torch.compile or fake-tensor tracing, no dispatch mode active and
the machine not busy (1-minute load average at most the CPU count: a busy machine's
timings would be cached for good), unless ``QLORA_KERNELS_CALIBRATE=0``. Until then the
features rule holds; ``calibrate_gemv()`` or ``qlora-kernels calibrate`` runs it on demand.
It takes about 2 s of CPU (one Zen 4 core).

Cache: ``gemv_calibration.json`` in ``QLORA_KERNELS_CALIBRATION_DIR``, else
``$XDG_CACHE_HOME/qlora_kernels``, else ``~/.cache/qlora_kernels``: the CPU model, its
features, torch's and this library's versions, and one entry per setting. A file that is
unreadable, not JSON, of another schema, with out-of-range values, or written for another
CPU or version is ignored with one warning naming it and why, and rewritten (atomically)
by the next calibration.

Example:
    >>> fake = {1: (1.0, 9.0), 2: (2.0, 9.0), 4: (4.0, 9.0), 8: (8.0, 9.0), 16: (16.0, 9.0)}
    >>> pick_threshold(lambda rows: fake.get(rows, (99.0, 9.0)))[0]
    8
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _extension, cpu_dispatch
from .fileio import atomic_write

ENV_CALIBRATE = "QLORA_KERNELS_CALIBRATE"
ENV_DIR = "QLORA_KERNELS_CALIBRATION_DIR"
FILE_NAME = "gemv_calibration.json"
SCHEMA = 1
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A 7B attention projection. A quarter of it (2048x2048, 5 rounds: 0.67 s of CPU against
# 1.75 s) put the 1-thread bf16 switch at 16 rows, where this layer's GEMM measured 26%
# faster; calibrated on 4096x4096 every pick at 1-128 rows on 4096x4096 and 1536x576 was
# right (benchmarks/README.md, GEMV/GEMM threshold).
SHAPE = (4096, 4096)
ROUNDS = 3

_lock = threading.RLock()
_loaded: Dict[Tuple[str, int], Optional[Dict[str, int]]] = {}  # setting -> rows per dtype
_attempted: set = set()  # settings calibrated (or tried) automatically in this process
_warned: set = set()


def cache_dir() -> str:
    """Where the calibration is cached: ``QLORA_KERNELS_CALIBRATION_DIR``, else the user cache
    directory.

    Example:
        >>> os.path.basename(cache_dir()) != ""
        True
    """
    path = os.environ.get(ENV_DIR)
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qlora_kernels")


def cache_path() -> str:
    """The calibration cache file.

    Example:
        >>> os.path.basename(cache_path())
        'gemv_calibration.json'
    """
    return os.path.join(cache_dir(), FILE_NAME)


def machine_key() -> Dict[str, object]:
    """What a cache file must have been written for: the CPU model and features, torch's and
    this library's versions (another value of any makes the file foreign).

    Example:
        >>> sorted(machine_key())
        ['cpu', 'cpu_features', 'qlora_kernels', 'torch']
    """
    from . import system_info
    from . import __version__

    return {"cpu": system_info.cpu_model(), "cpu_features": cpu_dispatch.cpu_features(),
            "torch": torch.__version__, "qlora_kernels": __version__}


def _setting() -> Tuple[str, int]:
    return cpu_dispatch.cpu_isa(), torch.get_num_threads()


def _setting_name(setting: Tuple[str, int]) -> str:
    return f"{setting[0]}/threads={setting[1]}"


def pick_threshold(measure: Callable[[int], Tuple[float, float]],
                   rows: Tuple[int, ...] = ROWS) -> Tuple[int, List[List[float]]]:
    """The GEMV/GEMM threshold from ``measure(rows) -> (gemv_seconds, gemm_seconds)``, taken
    at ``rows`` in order until the GEMM has won twice in a row: the largest row count at
    which the GEMV was faster (0 if it never was), and the timings ``[rows, gemv, gemm]``.

    Example:
        >>> pick_threshold(lambda m: (m * 1.0, 20.0))  # GEMV wins to 16, loses from 32
        (16, [[1, 1.0, 20.0], [2, 2.0, 20.0], [4, 4.0, 20.0], [8, 8.0, 20.0], [16, 16.0, 20.0], [32, 32.0, 20.0], [64, 64.0, 20.0]])
    """
    best, gemm_wins, timings = 0, 0, []
    for m in rows:
        gemv, gemm = measure(m)
        timings.append([m, gemv, gemm])
        if gemv < gemm:
            best, gemm_wins = m, 0
        else:
            gemm_wins += 1
            if gemm_wins == 2:
                break
    return best, timings


def time_paths(dtype: torch.dtype, shape: Optional[Tuple[int, int]] = None,
               rounds: Optional[int] = None) -> Callable[[int], Tuple[float, float]]:
    """``measure(rows)`` for ``pick_threshold``: the fastest of ``rounds`` calls of
    ``matmul_4bit``'s GEMV path and of its GEMM path on an NF4 + double-quant weight of
    ``shape`` (default ``SHAPE``) and ``rows`` rows of x in ``dtype``, one call of each per
    round (order alternating) after a warm-up; CPU time of the calling thread when torch
    uses one thread, wall time otherwise. The inputs come from a private generator: the
    caller's random stream is left as it was.

    Example:
        >>> gemv, gemm = time_paths(torch.float32, (64, 128), rounds=1)(2)
        >>> gemv > 0 and gemm > 0
        True
    """
    from . import functional, matmul

    gen = torch.Generator().manual_seed(0)
    n, k = shape or SHAPE
    rounds = rounds or ROUNDS
    packed, state = functional.quantize_4bit(torch.randn(n, k, generator=gen) * 0.02,
                                             double_quant=True)
    absmax, code, blocksize, nested_absmax, nested_code, offset = state.op_args()
    args = (packed, absmax, code, blocksize, n, nested_absmax, nested_code, offset, None)
    paths = (matmul._gemv_path, matmul._gemm_path)
    # One thread: that thread's CPU time, which other processes on a busy machine barely
    # disturb. More: wall time, the latency the threads deliver together.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter

    def measure(rows: int) -> Tuple[float, float]:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        times: Tuple[List[float], List[float]] = ([], [])
        for path in paths:  # warm-up
            path(x, *args)
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t0 = clock()
                paths[i](x, *args)
                times[i].append(clock() - t0)
        return min(times[0]), min(times[1])
    return measure


def calibrate_gemv(measure: Optional[Callable[[torch.dtype], Callable]] = None,
                   write: bool = True) -> Dict[str, object]:
    """Measure this machine's GEMV/GEMM threshold now, per dtype of x, with torch's current
    thread count and CPU path, put it in force and (``write``) in the cache file. Returns the
    entry: ``gemv_max_rows`` per dtype, the ``seconds`` (and ``cpu_seconds``) the
    calibration took, ``timings_ms`` (``[rows, GEMV ms, GEMM ms]`` per dtype).
    ``measure(dtype)`` gives ``pick_threshold``'s timer (default ``time_paths(dtype)``).
    RuntimeError without the compiled extension or under a backend override (their
    kernels are not the ones the threshold is for).

    Example:
        >>> fake = lambda dtype: lambda rows: (rows * 1.0, 10.0)
        >>> calibrate_gemv(fake, write=False)["gemv_max_rows"]
        {'float32': 8, 'bfloat16': 8, 'float16': 8}
        >>> _forget()
    """
    from . import backends

    if measure is None:
        if not _extension.EXTENSION_LOADED:
            raise RuntimeError("calibrate_gemv: the compiled extension is not loaded; the "
                               "reference kernels have no GEMV/GEMM switch worth measuring")
        if backends.overriding():
            raise RuntimeError(f"calibrate_gemv: backend {backends.current_backend()!r} is "
                               "selected; calibrate the compiled CPU kernels without it")
        measure = time_paths
    setting = _setting()
    with _lock, torch.no_grad(), torch.autocast("cpu", enabled=False):
        t0, cpu0 = time.perf_counter(), time.process_time()
        rows, timings = {}, {}
        for name, dtype in DTYPES.items():
            rows[name], timings[name] = pick_threshold(measure(dtype))
        entry = {"gemv_max_rows": rows, "seconds": round(time.perf_counter() - t0, 3),
                 "cpu_seconds": round(time.process_time() - cpu0, 3),
                 "load_average": _load_average(),
                 "shape": list(SHAPE), "threads": setting[1],
                 "timings_ms": {dt: [[m, round(a * 1e3, 4), round(b * 1e3, 4)] for m, a, b in t]
                                for dt, t in timings.items()}}
        _loaded[setting] = rows
        if write:
            _write_entry(setting, entry)
    return entry


def cached_gemv_max_rows(dtype: torch.dtype, may_calibrate: bool = False) -> Optional[int]:
    """This machine's calibrated threshold for x of ``dtype`` under the current setting, or
    None where there is none (then the features rule holds). ``may_calibrate``: measure it
    now if it is missing and the rules of automatic calibration allow (module docstring).

    Example:
        >>> isinstance(cached_gemv_max_rows(torch.float32), (int, type(None)))
        True
    """
    if not _extension.EXTENSION_LOADED:
        return None
    setting = _setting()
    if setting not in _loaded:
        _loaded[setting] = _read_entry(setting)
    rows = _loaded[setting]
    if rows is None and may_calibrate and setting not in _attempted and _may_calibrate_now():
        with _lock:
            if setting not in _attempted:
                _attempted.add(setting)
                try:
                    rows = calibrate_gemv()["gemv_max_rows"]
                except Exception as exc:  # a failed measurement must not fail the matmul
                    _warn_once(cache_path(), f"calibration failed ({exc!r})",
                               "the features rule holds")
                    rows = None
    return None if rows is None else rows.get(str(dtype).removeprefix("torch."))


def _may_calibrate_now() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from . import backends

    return (os.environ.get(ENV_CALIBRATE, "1") != "0" and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None
            and not backends.overriding()
            and not machine_busy())


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # no load average on this platform
        return None


def machine_busy() -> bool:
    """Whether the 1-minute load average exceeds the CPU count (False where there is none):
    timings taken now would measure the other work as much as the kernels.

    Example:
        >>> machine_busy() in (True, False)
        True
    """
    load = _load_average()
    return load is not None and load > (os.cpu_count() or 1)


def _warn_once(path: str, why: str, then: str) -> None:
    if (path, why) not in _warned:
        _warned.add((path, why))
        warnings.warn(f"GEMV/GEMM calibration cache {path}: {why}; {then}", RuntimeWarning,
                      stacklevel=3)


def _check_file(data: object, machine: Dict[str, object]) -> Optional[str]:
    """Why ``data`` is not a usable cache for ``machine`` (None: it is)."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else type(data).__name__
        return f"schema {schema!r}, expected {SCHEMA}"
    for field, ours in machine.items():
        if data.get(field) != ours:
            return f"written for {field} {data.get(field)!r}, this is {ours!r}"
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return "wrong schema: no 'entries' object"
    for name, entry in entries.items():
        rows = entry.get("gemv_max_rows") if isinstance(entry, dict) else None
        if not isinstance(rows, dict) or set(rows) != set(DTYPES):
            return f"wrong schema: entry {name!r} has no gemv_max_rows for {sorted(DTYPES)}"
        for dt, value in rows.items():
            if type(value) is not int or not 0 <= value <= ROWS[-1]:
                return f"out-of-range value: {name} {dt} {value!r} (expected 0..{ROWS[-1]})"
    return None


def _read_file(path: str) -> Optional[dict]:
    """The cache's contents when they are usable here; None (after one warning if the file
    exists but is not) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = f"unreadable ({exc.__class__.__name__}: {exc})"
    except json.JSONDecodeError as exc:
        why = f"not JSON ({exc})"
    else:
        why = _check_file(data, machine_key())
        if why is None:
            return data
    _warn_once(path, why, "ignored (the features rule holds) until the next calibration "
               "rewrites it")
    return None


def _read_entry(setting: Tuple[str, int]) -> Optional[Dict[str, int]]:
    data = _read_file(cache_path())
    entry = (data or {}).get("entries", {}).get(_setting_name(setting))
    return None if entry is None else entry["gemv_max_rows"]


def _write_entry(setting: Tuple[str, int], entry: dict) -> None:
    path = cache_path()
    data = _read_file(path) or dict(schema=SCHEMA, **machine_key(), entries={})
    data["entries"][_setting_name(setting)] = entry
    try:
        atomic_write(path, lambda tmp: _dump(tmp, data))
    except OSError as exc:
        _warn_once(path, f"not writable ({exc})", "the calibration holds for this process only")


def _dump(tmp: str, data: dict) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _forget() -> None:
    """Drop what this process has loaded, calibrated and warned about (for tests)."""
    _loaded.clear()
    _attempted.clear()
    _warned.clear()

