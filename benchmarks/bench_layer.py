"""The 4-bit layer against dense ``F.linear`` in the same compute dtype: forward and
forward+backward (input gradient; the weight is frozen) at 1 to 2048 rows of x, bf16 and
float32, and the GEMV/GEMM switch checked at 1, 2, 4, ..., 128 rows.

For each weight shape, dtype and row count, in the same run: ``matmul_4bit`` (NF4 + double
quant, the path the threshold picks) forward and forward+backward, dense ``F.linear`` with
the weight in that dtype (same two timings), and up to 128 rows the forward forced onto
the GEMV and onto the GEMM path. ``switch ok`` says whether the automatic choice was the
faster of the two (or they are within 5%). All timings of one (shape, dtype, rows) are
taken round-robin in the same rounds; ratios are medians of per-round ratios.

The threshold in force (and where it comes from) is printed per dtype first; where this
machine is not calibrated yet for the thread count, the calibration runs before the timings
(unless QLORA_KERNELS_CALIBRATE=0).

Usage: python benchmarks/bench_layer.py [--json out.json] [--quick] [--max-rows 128]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from qlora_kernels import matmul as mm  # noqa: E402
from benchmarks.timing import (cpu_timing_parser, cpu_timing_setup, device_info,  # noqa: E402
                               median_ratio, paired_times, write_json)

SHAPES = [(4096, 4096), (1536, 576)]  # a 7B attention projection; SmolLM2's MLP up/gate
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
DTYPES = (torch.bfloat16, torch.float32)


def _fwd_bwd(f, x, g):
    def run():
        x.grad = None
        f(x).backward(g)
    return run


def _forced(f, x, dt, limit):
    """f(x) with the GEMV/GEMM threshold for dt set to ``limit`` (0: GEMM, huge: GEMV)."""
    def run():
        saved = dict(mm.GEMV_MAX_ROWS)
        mm.set_gemv_max_rows(limit, "cpu", dt)
        try:
            with torch.no_grad():
                f(x)
        finally:
            mm.GEMV_MAX_ROWS.clear()
            mm.GEMV_MAX_ROWS.update(saved)
    return run


def _no_grad(f, x):
    def run():
        with torch.no_grad():
            f(x)
    return run


def bench(shapes, rows, rounds, clock=None):
    """Per (shape, dtype, rows): every timing taken round-robin in the same rounds
    (timing.paired_times), medians and median per-round ratios."""
    out = []
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        packed, state = qk.quantize_4bit(w, double_quant=True)
        for dt in DTYPES:
            wd = w.to(dt)
            for m in rows:
                x = torch.randn(m, k).to(dt).requires_grad_()
                g = torch.randn(m, n).to(dt)
                ours = lambda t: qk.matmul_4bit(t, packed, state)  # noqa: E731
                dense = lambda t: F.linear(t, wd)  # noqa: E731
                fns = {"ours_fwd": _no_grad(ours, x), "dense_fwd": _no_grad(dense, x),
                       "ours_fwdbwd": _fwd_bwd(ours, x, g), "dense_fwdbwd": _fwd_bwd(dense, x, g)}
                if m <= 128:
                    fns["gemv_fwd"] = _forced(ours, x, dt, 10**9)
                    fns["gemm_fwd"] = _forced(ours, x, dt, 0)
                t = paired_times(fns, warmup=1, rounds=max(3, rounds // 2) if m >= 512 else rounds,
                                 clock=clock)
                r = {"shape": [n, k], "dtype": str(dt).removeprefix("torch."), "rows": m,
                     "gemv_max_rows": mm.gemv_max_rows("cpu", dt)}
                r.update({f"{name}_ms": v * 1e3 for name, v in t["median"].items()})
                r["fwd_ratio"] = median_ratio(t["rounds"], "ours_fwd", "dense_fwd")
                r["fwdbwd_ratio"] = median_ratio(t["rounds"], "ours_fwdbwd", "dense_fwdbwd")
                if m <= 128:
                    r["gemv_over_gemm"] = median_ratio(t["rounds"], "gemv_fwd", "gemm_fwd")
                out.append(r)
    return out


def main(argv=None):
    parser = cpu_timing_parser(__doc__)
    parser.add_argument("--max-rows", type=int, help="only row counts up to this (128: the "
                        "GEMV/GEMM switch alone)")
    args = parser.parse_args(argv)
    clock = cpu_timing_setup(args)
    shapes = [(256, 512)] if args.quick else SHAPES
    rows = [m for m in ([1, 8, 64] if args.quick else ROWS) if m <= (args.max_rows or m)]
    thresholds = {str(dt).removeprefix("torch."): mm.gemv_threshold("cpu", dt, may_calibrate=True)
                  for dt in DTYPES}
    rows_out = bench(shapes, rows, 3 if args.quick else args.rounds, clock)
    info = device_info("cpu")
    info["cpu_features"] = qk.cpu_dispatch.cpu_features()
    info["cpu_isa"] = qk.cpu_dispatch.cpu_isa()
    info["clock"] = "process CPU time" if args.cpu_time else "wall"
    info["gemv_max_rows"] = {dt: {"rows": r, "source": src} for dt, (r, src) in thresholds.items()}
    print(f"# {info['device']} | torch {info['torch']} | threads {info['threads']} | "
          f"{info['date']} | {' '.join(info['cpu_features'])} | path {info['cpu_isa']} | "
          f"clock: {info['clock']}")
    for dt, (r, src) in thresholds.items():
        print(f"# GEMV/GEMM threshold, {dt} x: {r} ({src})")
    print(f"{'N x K':>10} {'dtype':>8} {'rows':>5} {'fwd ms':>8} {'dense':>8} {'ratio':>6} "
          f"{'fwd+bwd':>8} {'dense':>8} {'ratio':>6} {'gemv':>8} {'gemm':>8} {'switch ok':>9}")
    for r in rows_out:
        line = (f"{'x'.join(map(str, r['shape'])):>10} {r['dtype']:>8} {r['rows']:>5} "
                f"{r['ours_fwd_ms']:>8.2f} {r['dense_fwd_ms']:>8.2f} {r['fwd_ratio']:>6.2f} "
                f"{r['ours_fwdbwd_ms']:>8.2f} {r['dense_fwdbwd_ms']:>8.2f} {r['fwdbwd_ratio']:>6.2f}")
        if "gemv_fwd_ms" in r:
            gemv_faster = r["gemv_over_gemm"] <= 1.0
            picked_gemv = r["rows"] <= r["gemv_max_rows"]
            # right when it picked the faster path, or the two are within 5%
            ok = picked_gemv == gemv_faster or abs(r["gemv_over_gemm"] - 1.0) <= 0.05
            r["switch_ok"] = ok
            line += f" {r['gemv_fwd_ms']:>8.2f} {r['gemm_fwd_ms']:>8.2f} {str(ok):>9}"
        print(line)
    if args.json:
        write_json(args.json, {"info": info, "rows": rows_out})
    return rows_out


if __name__ == "__main__":
    main()
