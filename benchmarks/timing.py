"""Timing helpers shared by the benchmark scripts.

CPU: repeated ``time.perf_counter`` after warm-up, median. GPU: CUDA events, median.

Example:
    >>> from benchmarks.timing import median_time
    >>> median_time(lambda: sum(range(100)), device="cpu", warmup=1, reps=3) > 0
    True
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time

import torch


def median_time(fn, device="cpu", warmup: int = 3, reps: int = 15, clock=None) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls. CPU: measured with ``clock``
    (default ``time.perf_counter``; ``time.process_time`` counts this process's CPU time,
    which a loaded machine disturbs far less than wall time, for single-thread runs)."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    clock = clock or time.perf_counter
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def paired_times(fns: dict, device="cpu", warmup: int = 2, rounds: int = 15, clock=None) -> dict:
    """Time several functions round-robin: each round runs every function once (order
    rotating), so all of them see the same machine load. Returns per-function median
    seconds and, for ratios, the per-round times (``name -> list``).

    Example:
        >>> r = paired_times({"a": lambda: sum(range(10)), "b": lambda: sum(range(20))}, rounds=3)
        >>> sorted(r["median"])
        ['a', 'b']
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    # calls per measurement: enough for ~10 ms, so short kernels are not timer noise
    inner = {n: max(1, int(0.01 / max(median_time(fns[n], device, warmup=0, reps=3, clock=clock),
                                       1e-7)))
             for n in names}
    per = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            k = inner[n]

            def batch(fn=fns[n], k=k):
                for _ in range(k):
                    fn()
            per[n].append(median_time(batch, device, warmup=0, reps=1, clock=clock) / k)
    return {"median": {n: statistics.median(v) for n, v in per.items()}, "rounds": per}


def cpu_timing_parser(doc: str, rounds: int = 9):
    """An argument parser with the options of the round-robin CPU benchmarks (--json,
    --quick, --rounds, --threads, --cpu-time); ``cpu_timing_setup(args)`` applies them and
    returns the clock to time with.

    Example:
        >>> args = cpu_timing_parser("x").parse_args(["--cpu-time"])
        >>> cpu_timing_setup(args) is time.process_time
        True
    """
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time (robust on a loaded machine; "
                             "meaningful with --threads 1)")
    return parser


def cpu_timing_setup(args):
    """Set torch's thread count from ``args.threads``; the clock ``args.cpu_time`` asks for
    (None: timing's default wall clock)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return time.process_time if args.cpu_time else None


def median_ratio(rounds: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) (see ``paired_times``)."""
    return statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))


def copy_time(nbytes: int, device="cpu", **kw) -> float:
    """Median seconds of a device memory copy that moves ``nbytes`` in total (half read,
    half written), into a preallocated buffer."""
    half = max(int(nbytes) // 2, 1)
    src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_time(lambda: dst.copy_(src), device=device, **kw)


def optional_bitsandbytes():
    """The ``bitsandbytes`` module when it happens to be installed, else None: its rows are
    an optional comparison in the benchmarks, never a dependency.

    Example:
        >>> bnb = optional_bitsandbytes()
        >>> bnb is None or hasattr(bnb, "matmul_4bit")
        True
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import bitsandbytes
    return bitsandbytes


def device_info(device="cpu") -> dict:
    """Device name, torch version and thread count, for result files."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    info["device"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def write_json(path: str, obj, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename, so an
    interrupted benchmark never leaves a half-written results file.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
        >>> write_json(p, {"ms": 1.5}); json.load(open(p))
        {'ms': 1.5}
    """
    from qlora_kernels.fileio import atomic_write

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)

    atomic_write(path, write)
