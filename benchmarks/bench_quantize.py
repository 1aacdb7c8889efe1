"""Quantize / dequantize speed per backend against the reference and a memory copy.

For each shape (4096x4096 and the 14336x4096 MLP weight, bf16) and each available backend:
median time, achieved GB/s (bytes the kernel must move), and the ratio to a device memory
copy moving the same number of bytes (half read, half written), measured in the same run:
kernels and copies run round-robin, and the ratio is the median of per-round ratios, so
load on a shared machine hits both alike. Dequantize is timed into a
preallocated output (``out=``), like the copy; with and without double quantization.

When bitsandbytes happens to be installed (never a dependency), its quantize_4bit /
dequantize_4bit (NF4, with and without compress_statistics) are rows of backend
``bitsandbytes`` with the same columns. Its quantize, like the reference, is timed apart
(3 repetitions; the ratio is against the round-robin copy median); its dequantize runs in
the round-robin, into ``out=`` where bitsandbytes has an ``out`` kernel for the device
(not its CPU backend: there it allocates, ``"out": false`` in the row).

``--isa-paths`` instead times the CPU 8-bit blockwise encoder (op ``quantize_8bit``, float32
x, the signed dynamic code, blocksize 256, as ``quantize_blockwise``) on each SIMD path this
CPU has (avx2 and up, forced with ``cpu_dispatch.set_cpu_isa``), round-robin in one process
(process CPU time with ``--threads 1``), and prints each path's time and avx2's time over it.

Usage: python benchmarks/bench_quantize.py [--json out.json] [--quick] [--device cuda]
       python benchmarks/bench_quantize.py --isa-paths [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from benchmarks.timing import (device_info, median_ratio, median_time,  # noqa: E402
                               optional_bitsandbytes, paired_times, write_json)
from qlora_kernels import cpu_dispatch  # noqa: E402
from qlora_kernels.formats import dynamic_map  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096)]


def _bnb_ops(bnb, w, out) -> dict:
    """bitsandbytes' four ops on ``w`` (NF4, blocksize 64): ``op -> (fn, uses_out)``."""
    F = bnb.functional
    packed, s_plain = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    _, s_dq = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

    def dequantize(state):
        try:  # into out= like ours, where bitsandbytes has that kernel for the device
            F.dequantize_4bit(packed, state, out=out)
            return (lambda: F.dequantize_4bit(packed, state, out=out)), True
        except NotImplementedError:
            return (lambda: F.dequantize_4bit(packed, state)), False

    return {"quantize": ((lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4")), False),
            "quantize+DQ": ((lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                     compress_statistics=True)), False),
            "dequantize": dequantize(s_plain), "dequantize+DQ": dequantize(s_dq)}


def bench(device: str, shapes, backends, reps: int, bnb=None):
    """Every backend's four ops and the two copies, timed round-robin per shape (the
    reference backend, ~100x slower, and bitsandbytes' quantize separately with fewer
    repetitions). ``bnb``: the bitsandbytes module for its optional rows (None: none)."""
    rows = []
    for shape in shapes:
        w = torch.randn(*shape, dtype=torch.bfloat16, device=device)
        n = w.numel()
        packed, s_plain = qk.quantize_4bit(w, double_quant=False)
        _, s_dq = qk.quantize_4bit(w, double_quant=True)
        out = torch.empty_like(w)
        q_bytes = n * 2 + packed.numel() + s_plain.absmax.numel() * 4
        d_bytes = packed.numel() + s_plain.absmax.numel() * 4 + n * 2
        half_q = torch.randint(0, 255, (q_bytes // 2,), dtype=torch.uint8, device=device)
        half_d = torch.randint(0, 255, (d_bytes // 2,), dtype=torch.uint8, device=device)
        dst_q, dst_d = torch.empty_like(half_q), torch.empty_like(half_d)
        fns = {"copy_q": lambda: dst_q.copy_(half_q), "copy_d": lambda: dst_d.copy_(half_d)}
        ops = {}
        for be in backends:
            ops[(be, "quantize")] = (lambda be=be: qk.quantize_4bit(w, double_quant=False, backend=be),
                                     q_bytes, "copy_q")
            ops[(be, "quantize+DQ")] = (lambda be=be: qk.quantize_4bit(w, double_quant=True, backend=be),
                                        q_bytes, "copy_q")
            ops[(be, "dequantize")] = (lambda be=be: qk.dequantize_4bit(packed, s_plain, out=out, backend=be),
                                       d_bytes, "copy_d")
            ops[(be, "dequantize+DQ")] = (lambda be=be: qk.dequantize_4bit(packed, s_dq, out=out, backend=be),
                                          d_bytes, "copy_d")
        uses_out = {}
        if bnb is not None:
            for op, (fn, used) in _bnb_ops(bnb, w, out).items():
                ops[("bitsandbytes", op)] = (fn, q_bytes if op.startswith("quantize") else d_bytes,
                                             "copy_q" if op.startswith("quantize") else "copy_d")
                uses_out[op] = used

        def slow(be, op):
            return be == "torch" or (be == "bitsandbytes" and op.startswith("quantize"))

        fast = {f"{be}/{op}": fn for (be, op), (fn, _, _) in ops.items() if not slow(be, op)}
        timed = paired_times({**fns, **fast}, device, rounds=reps)
        for (be, op), (fn, nbytes, copy) in ops.items():
            key = f"{be}/{op}"
            if slow(be, op):
                t = median_time(fn, device, warmup=1, reps=3)
                ratio = t / timed["median"][copy]
            else:
                t = timed["median"][key]
                ratio = median_ratio(timed["rounds"], key, copy)
            rows.append({"shape": list(shape), "backend": be, "op": op, "ms": t * 1e3,
                         "GB/s": nbytes / t / 1e9, "copy_ms": timed["median"][copy] * 1e3,
                         "x_copy": ratio})
            if be == "bitsandbytes" and op.startswith("dequantize"):
                rows[-1]["out"] = uses_out[op]
        if "cpu" in backends or "cuda" in backends:
            be = "cuda" if "cuda" in backends else "cpu"
            rows.append({"shape": list(shape), "backend": be, "op": "DQ overhead",
                         "ratio": median_ratio(timed["rounds"], f"{be}/dequantize+DQ", f"{be}/dequantize")})
    return rows


def bench_isa_paths_8bit(sizes, rounds: int, clock) -> list:
    """quantize_8bit on every SIMD path this CPU has, per number of elements."""
    best = cpu_dispatch.cpu_isa()
    paths = [p for p in cpu_dispatch.ISA_NAMES[1: cpu_dispatch.ISA_NAMES.index(best) + 1]
             if p != "avx512_bf16"]  # the encoder has no bf16-instruction path of its own
    code = dynamic_map(signed=True)
    out = []
    try:
        for n in sizes:
            x = torch.randn(n)

            def run(path, x=x):
                cpu_dispatch.set_cpu_isa(path)
                return torch.ops.qlora_kernels.quantize_8bit(x, code, 256)
            timed = paired_times({p: (lambda p=p: run(p)) for p in paths}, rounds=rounds,
                                 clock=clock)
            out.append({"numel": n, **{f"{p}_ms": v * 1e3 for p, v in timed["median"].items()},
                        **{f"avx2_over_{p}": median_ratio(timed["rounds"], "avx2", p)
                           for p in paths}})
    finally:
        cpu_dispatch.set_cpu_isa(best)
    for r in out:
        cols = " ".join(f"{p} {r[f'{p}_ms']:8.3f} ms (x{r[f'avx2_over_{p}']:.3f})" for p in paths)
        print(f"quantize_8bit numel {r['numel']:>9}: {cols}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="small shape, few repetitions")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--isa-paths", action="store_true",
                        help="the CPU 8-bit encoder on each SIMD path this CPU has")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.isa_paths:
        clock = time.process_time if args.threads == 1 else None
        sizes = [4096, 1 << 20, 10_000_000]
        return bench_isa_paths_8bit(sizes, 5 if args.quick else 15, clock)
    shapes = [(1024, 1024)] if args.quick else SHAPES
    reps = 3 if args.quick else args.reps
    dev_type = torch.device(args.device).type
    # interpreted Triton on the CPU measures the interpreter, not the kernel
    backends = [b for b in qk.available_backends(dev_type) if not (dev_type == "cpu" and b == "triton")]
    bnb = optional_bitsandbytes()
    rows = bench(args.device, shapes, backends, reps, bnb)
    info = device_info(args.device)
    if bnb is not None:
        info["bitsandbytes"] = bnb.__version__
    print(f"# {info['device']} | torch {info['torch']} | threads {info['threads']} | {info['date']}"
          + (f" | bitsandbytes {bnb.__version__}" if bnb is not None else ""))
    print(f"{'shape':>12} {'backend':>12} {'op':>14} {'ms':>8} {'GB/s':>7} {'copy ms':>8} {'x copy':>7}")
    for r in rows:
        if r["op"] == "DQ overhead":
            print(f"DQ overhead {r['shape']} {r['backend']}: {100 * (r['ratio'] - 1):+.1f}% "
                  "(median per-round ratio, dequantize+DQ / dequantize)")
            continue
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['backend']:>12} {r['op']:>14} {r['ms']:>8.2f} "
              f"{r['GB/s']:>7.1f} {r['copy_ms']:>8.2f} {r['x_copy']:>7.2f}"
              + ("  (allocates: no out= kernel)" if r.get("out") is False else ""))
    if args.json:
        write_json(args.json, {"info": info, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
