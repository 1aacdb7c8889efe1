"""Run every benchmark on the available device; write results and plots.

    python -m benchmarks [--quick] [--device cuda] [--out benchmarks/results] [--only a,b]

Sections: ``ceilings`` (a large memory copy, a large dense matmul), ``quantize``,
``matmul``, ``dq_codes``, ``lora``, ``optim``, ``train_step``; each is one script in
benchmarks/ (run alone for more options). Results go to ``<out>/<device-name>.json`` and
PNG plots beside it (``<device-name>-<section>.png``; needs matplotlib). ``--quick`` runs
every section on small shapes in a few minutes (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import (bench_dq_codes, bench_lora, bench_matmul, bench_optim,  # noqa: E402
                        bench_quantize, bench_train_step)
from benchmarks.plots import plot_all  # noqa: E402
from benchmarks.timing import copy_time, device_info, median_time, optional_bitsandbytes  # noqa: E402
from qlora_kernels.fileio import atomic_write  # noqa: E402

SECTIONS = ("ceilings", "quantize", "matmul", "dq_codes", "lora", "optim", "train_step")


def ceilings(device: str, quick: bool) -> dict:
    """Measured ceilings: copy bandwidth (bytes read + written per second) and dense matmul
    throughput in float32 and bf16."""
    n = (1 << 22) if quick else (1 << 28)  # bytes copied (read n, write n)
    t = copy_time(2 * n, device, reps=5 if quick else 15)
    out = {"copy_bytes": n, "copy_GBps": 2 * n / t / 1e9}
    on_gpu = torch.device(device).type == "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        # CPUs without native bf16 run bf16 GEMMs hundreds of times slower: smaller there
        size = 512 if quick else (4096 if on_gpu else (2048 if dtype == torch.float32 else 512))
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = median_time(lambda: a @ b, device, reps=3 if quick else 7)
        name = str(dtype).split('.')[-1]
        out[f"matmul_{name}_TFLOPs"] = 2 * size**3 / t / 1e12
        out[f"matmul_{name}_size"] = size
    return out


def _section_argv(name: str, quick: bool, device: str, tmp: str) -> list:
    argv = ["--json", tmp]
    if name in ("quantize", "matmul", "optim", "train_step"):
        argv += ["--device", device]
    if quick:
        argv += {"quantize": ["--quick"], "matmul": ["--quick"], "dq_codes": ["--quick"],
                 "lora": ["--dim", "512", "--tokens", "64", "--r", "8"],
                 "optim": ["--numel", "1000000", "--rounds", "3", "--warmup", "1"],
                 "train_step": ["--quick"]}[name]
    return argv


MODULES = {"quantize": bench_quantize, "matmul": bench_matmul, "dq_codes": bench_dq_codes,
           "lora": bench_lora, "optim": bench_optim, "train_step": bench_train_step}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    args = parser.parse_args(argv)
    sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    os.makedirs(args.out, exist_ok=True)
    info = device_info(args.device)
    bnb = optional_bitsandbytes()  # optional comparison rows in quantize and matmul
    if bnb is not None:
        info["bitsandbytes"] = bnb.__version__
    name = slug(info["device"]) + ("-quick" if args.quick else "")
    results = {"info": info, "quick": args.quick, "sections": {}}
    path = os.path.join(args.out, f"{name}.json")
    if args.only and os.path.exists(path):
        # re-running some sections keeps the earlier results of the others
        with open(path) as f:
            results["sections"] = json.load(f).get("sections", {})
    for section in sections:
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        if section == "ceilings":
            data = ceilings(args.device, args.quick)
            print(json.dumps(data, indent=1))
        else:
            tmp = os.path.join(args.out, f".{name}-{section}.json")
            try:
                MODULES[section].main(_section_argv(section, args.quick, args.device, tmp))
            except ImportError as exc:  # e.g. transformers for train_step
                print(f"   skipped: {exc}")
                results["sections"][section] = {"skipped": str(exc)}
                continue
            with open(tmp) as f:
                data = json.load(f)
            os.unlink(tmp)
        results["sections"][section] = data
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)

    atomic_write(path, write)  # never a half-written results file
    print(f"wrote {path}")
    for png in plot_all(results, args.out, name):
        print(f"wrote {png}")
    return results


if __name__ == "__main__":
    main()
