"""Routing costs: the backend override and the one entry into the 4-bit matmul.

1. ``QLORA_KERNELS_BACKEND``: a 4096x4096 batch-1 ``qk.matmul_4bit`` (NF4 + double quant,
   float32 x, no grad) with the default routing (compiled kernels) and with the variable
   set to ``torch`` (the reference, a fresh process since the variable is read at import);
   the reference dequantizes the whole weight each call, so it must be several times slower.
2. ``Linear4bit`` no-grad forward against ``qk.matmul_4bit`` on the same weight, 512x512,
   batch 1, float32: both take the same path, so the ratio is the layer's own overhead
   (median of 200 calls after warm-up, the two timed round-robin).

Usage: python benchmarks/bench_routing.py [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from benchmarks.timing import device_info, median_time, write_json  # noqa: E402


def matmul_ms(n: int, k: int, reps: int) -> float:
    """Median ms of one batch-1 no-grad matmul_4bit on an (n, k) NF4 weight, in this process
    (whatever backend the environment selected)."""
    packed, state = qk.quantize_4bit(torch.randn(n, k))
    x = torch.randn(1, k)
    with torch.no_grad():
        return median_time(lambda: qk.matmul_4bit(x, packed, state), warmup=3, reps=reps) * 1e3


def matmul_ms_with_env(n: int, k: int, reps: int, backend: str) -> float:
    """``matmul_ms`` in a fresh process with QLORA_KERNELS_BACKEND=backend."""
    env = dict(os.environ, QLORA_KERNELS_BACKEND=backend)
    code = (f"import benchmarks.bench_routing as b; print(b.matmul_ms({n}, {k}, {reps}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def layer_vs_function(n: int, k: int, calls: int = 200) -> dict:
    """Per-call medians (us) of Linear4bit(x) and qk.matmul_4bit(x, ...) on one weight."""
    lin = qk.Linear4bit.from_linear(torch.nn.Linear(k, n, bias=False))
    packed, state = lin.packed_weight, lin.quant_state
    x = torch.randn(1, k)
    fns = {"Linear4bit": lambda: lin(x), "matmul_4bit": lambda: qk.matmul_4bit(x, packed, state)}
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(50):
                fn()
        for i in range(calls):
            for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    return {"layer_us": med["Linear4bit"], "function_us": med["matmul_4bit"],
            "ratio": med["Linear4bit"] / med["matmul_4bit"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    native = matmul_ms_with_env(4096, 4096, 15, "")
    reference = matmul_ms_with_env(4096, 4096, 5, "torch")
    layer = layer_vs_function(512, 512)
    result = {"device": device_info("cpu"), "native_ms": native, "reference_ms": reference,
              "reference_over_native": reference / native, **layer}
    print(f"matmul_4bit 4096x4096 batch 1: default {native:.3f} ms, "
          f"QLORA_KERNELS_BACKEND=torch {reference:.3f} ms ({reference / native:.1f}x)")
    print(f"512x512 batch 1 no grad: Linear4bit {layer['layer_us']:.1f} us, "
          f"qk.matmul_4bit {layer['function_us']:.1f} us, ratio {layer['ratio']:.3f}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
