"""4-bit matmul speed: GEMV and GEMM paths against dense F.linear, and the GEMV/GEMM switch.

For each weight shape and number of rows of x: matmul_4bit (NF4 + double quant) forced to
the GEMV path and to the GEMM path, against dense ``F.linear`` with a bf16, fp16 and float32
weight, all measured in the same run (median after warm-up). Weights are rotated among
copies that together exceed the caches, so each call streams its weight from memory; rows
>= 512 use fewer repetitions. The smallest row count at which the GEMM path wins is the
measured threshold for ``qlora_kernels.matmul``. When bitsandbytes happens to be installed
(never a dependency), a ``bnb_ms`` column times ``bitsandbytes.matmul_4bit`` on the same x
with NF4 + double quantization (compress_statistics), its weights rotated like ours.

``--isa-paths`` instead times the GEMV kernel on each SIMD path this CPU has (avx2 and up,
forced with ``cpu_dispatch.set_cpu_isa``), bf16 and float32 x, round-robin in one process
(process CPU time with ``--threads 1``), and prints each path's time and the ratio to avx2.

Usage: python benchmarks/bench_matmul.py [--json out.json] [--quick] [--isa-paths [--threads 1]]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from qlora_kernels import matmul as mm  # noqa: E402
from benchmarks.timing import (device_info, median_time, optional_bitsandbytes,  # noqa: E402
                               paired_times, write_json)
from qlora_kernels import cpu_dispatch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
ROTATE_BYTES = 64 << 20  # weights smaller than this are rotated among copies (cold cache)


class Rotation:
    """Cycle through enough copies of a weight that together exceed the caches, so every
    call streams its weight from memory like a model's layers do."""

    def __init__(self, make, nbytes: int):
        self.items = [make() for _ in range(max(1, min(8, -(-ROTATE_BYTES // max(nbytes, 1)))))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def bench(device, shapes, rows, reps, bnb=None):
    """One result dict per (shape, rows); ``bnb``: the bitsandbytes module for the optional
    ``bnb_ms`` column (None: no column)."""
    out = []
    for n, k in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        quant = Rotation(lambda: qk.quantize_4bit(w, double_quant=True), n * k // 2)
        if bnb is not None:
            # as transformers stores a bnb Linear4bit weight: NF4, compress_statistics=True
            bquant = Rotation(lambda: bnb.functional.quantize_4bit(
                w, blocksize=64, quant_type="nf4", compress_statistics=True), n * k // 2)
        dense = {dt: Rotation(lambda dt=dt: w.to(dt), n * k * torch.finfo(dt).bits // 8)
                 for dt in (torch.bfloat16, torch.float16, torch.float32)}
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            r = {"shape": [n, k], "rows": m}
            # big dense bf16/fp16 GEMMs crawl on CPUs without native support: fewer reps
            rr = max(2, reps // 4) if m >= 512 else reps
            for dt, rot in dense.items():
                xd = x.to(dt)
                name = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[dt]
                r[f"dense_{name}_ms"] = median_time(lambda: F.linear(xd, rot.next()), device,
                                                    warmup=1, reps=rr) * 1e3
            for path, limit in (("gemv", 10**9), ("gemm", 0)):
                if path == "gemv" and m > 128:
                    continue
                mm.set_gemv_max_rows(limit, torch.device(device).type)
                r[f"{path}_ms"] = median_time(lambda: qk.matmul_4bit(x, *quant.next()), device,
                                              warmup=1, reps=rr) * 1e3
            if bnb is not None:
                def bnb_call():
                    # how a bnb Linear4bit's forward calls it: the packed weight transposed
                    packed, state = bquant.next()
                    return bnb.matmul_4bit(x, packed.t(), quant_state=state)
                r["bnb_ms"] = median_time(bnb_call, device, warmup=1, reps=rr) * 1e3
            out.append(r)
    return out


def bench_isa_paths(shapes, rows, rounds: int, clock) -> list:
    """The CPU GEMV kernel on every SIMD path this CPU has, per shape, rows and x dtype."""
    best = cpu_dispatch.cpu_isa()
    paths = [p for p in cpu_dispatch.ISA_NAMES[1: cpu_dispatch.ISA_NAMES.index(best) + 1]
             if p != "avx512_bf16"]  # the GEMV has no bf16-instruction path of its own
    out = []
    try:
        for n, k in shapes:
            packed, state = qk.quantize_4bit(torch.randn(n, k) * 0.02)
            s2 = state.state2
            args = (packed, state.absmax, state.code, 64, n, s2.absmax, s2.code,
                    float(state.offset))
            for dtype in (torch.bfloat16, torch.float32):
                for m in rows:
                    x = torch.randn(m, k).to(dtype)

                    def run(path, x=x):
                        cpu_dispatch.set_cpu_isa(path)
                        return torch.ops.qlora_kernels.gemv_4bit(x, *args)
                    t = paired_times({p: (lambda p=p: run(p)) for p in paths}, rounds=rounds,
                                     clock=clock)["median"]
                    out.append({"shape": [n, k], "dtype": str(dtype).removeprefix("torch."),
                                "rows": m, **{f"{p}_ms": v * 1e3 for p, v in t.items()}})
    finally:
        cpu_dispatch.set_cpu_isa(best)
    for r in out:
        cols = " ".join(f"{p} {r[f'{p}_ms']:7.3f} ms (x{r['avx2_ms'] / r[f'{p}_ms']:.2f})"
                        for p in paths)
        print(f"{'x'.join(map(str, r['shape'])):>10} {r['dtype']:>8} rows {r['rows']:>3}: {cols}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--isa-paths", action="store_true",
                        help="the CPU GEMV on each SIMD path this CPU has")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.isa_paths:
        import time
        clock = time.process_time if args.threads == 1 else None
        return bench_isa_paths([(4096, 4096), (1536, 576)], [1, 4, 16], 5 if args.quick else 15,
                               clock)
    saved = dict(mm.GEMV_MAX_ROWS)
    shapes = [(1024, 1024)] if args.quick else SHAPES
    rows = [1, 8, 64] if args.quick else ROWS
    bnb = optional_bitsandbytes()
    try:
        rows_out = bench(args.device, shapes, rows, 3 if args.quick else args.reps, bnb)
    finally:
        mm.GEMV_MAX_ROWS.clear()
        mm.GEMV_MAX_ROWS.update(saved)
    info = device_info(args.device)
    if bnb is not None:
        info["bitsandbytes"] = bnb.__version__
    print(f"# {info['device']} | torch {info['torch']} | threads {info['threads']} | {info['date']}"
          + (f" | bitsandbytes {bnb.__version__}" if bnb is not None else ""))
    print(f"{'N x K':>12} {'rows':>5} {'gemv ms':>8} {'gemm ms':>8} {'bf16 ms':>8} {'f16 ms':>8} "
          f"{'f32 ms':>8} {'bf16/best':>9} {'best/f32':>8}" + (f" {'bnb ms':>8} {'bnb/best':>8}" if bnb else ""))
    for r in rows_out:
        best = min(v for key, v in r.items() if key in ("gemv_ms", "gemm_ms"))
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['rows']:>5} {r.get('gemv_ms', float('nan')):>8.2f} "
              f"{r['gemm_ms']:>8.2f} {r['dense_bf16_ms']:>8.2f} {r['dense_f16_ms']:>8.2f} "
              f"{r['dense_f32_ms']:>8.2f} "
              f"{r['dense_bf16_ms'] / best:>9.2f} {best / r['dense_f32_ms']:>8.2f}"
              + (f" {r['bnb_ms']:>8.2f} {r['bnb_ms'] / best:>8.2f}" if "bnb_ms" in r else ""))
    for shape in shapes:
        wins = [r["rows"] for r in rows_out if r["shape"] == list(shape) and "gemv_ms" in r
                and r["gemv_ms"] <= r["gemm_ms"]]
        print(f"GEMV wins for {shape} at rows {wins}")
    if args.json:
        write_json(args.json, {"info": info, "rows": rows_out})
    return rows_out


if __name__ == "__main__":
    main()
