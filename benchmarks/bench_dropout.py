"""LoRA dropout on the CPU: the ``dropout_seeded`` op (csrc/cpu/dropout_cpu.cpp) against
torch's ``F.dropout`` (what PEFT's ``nn.Dropout`` runs) and against the saved-mask path the
fused layer takes on other devices (``lora_fused.dropout_keep_mask``, then where and scale),
at the activation shapes of the demo's model and of a 7B layer, per CPU path of the op.

All three timed round-robin in the same rounds (timing.paired_times); the ratios are medians
of per-round ratios, baseline over ours (above 1: ours is faster).

Usage: python benchmarks/bench_dropout.py [--json out.json] [--quick] [--threads N] [--p 0.05]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import (cpu_timing_parser, cpu_timing_setup, device_info,  # noqa: E402
                               median_ratio, paired_times, write_json)
from qlora_kernels import cpu_dispatch  # noqa: E402
from qlora_kernels.lora_fused import dropout_keep_mask  # noqa: E402

# tokens x features: SmolLM2-135M's hidden and MLP widths at 256 and 1024 tokens, a 7B layer
SHAPES = [(256, 576), (256, 1536), (1024, 576), (512, 4096)]
DTYPES = (torch.float32, torch.bfloat16)


def bench(shapes, p: float, rounds: int, paths, clock=None):
    """Per (shape, dtype, CPU path): medians of the three and the two ratios."""
    out = []
    op = torch.ops.qlora_kernels.dropout_seeded.default
    for m, k in shapes:
        for dt in DTYPES:
            x = torch.randn(m, k).to(dt)

            def saved_mask():
                mask, scale = dropout_keep_mask(x.shape, p)
                return torch.where(mask, x, 0).mul_(scale)

            for path in paths:
                cpu_dispatch.set_cpu_isa(path)
                try:
                    t = paired_times({"seeded": lambda: op(x, 7, p),
                                      "torch_dropout": lambda: F.dropout(x, p, training=True),
                                      "saved_mask": saved_mask}, rounds=rounds, clock=clock)
                finally:
                    cpu_dispatch.set_cpu_isa(None)
                r = {"shape": [m, k], "dtype": str(dt).removeprefix("torch."), "path": path}
                r.update({f"{n}_us": v * 1e6 for n, v in t["median"].items()})
                r["torch_dropout_over_seeded"] = median_ratio(t["rounds"], "torch_dropout",
                                                              "seeded")
                r["saved_mask_over_seeded"] = median_ratio(t["rounds"], "saved_mask", "seeded")
                out.append(r)
    return out


def main(argv=None):
    parser = cpu_timing_parser(__doc__)
    parser.add_argument("--p", type=float, default=0.05, help="dropout probability (the demo's)")
    args = parser.parse_args(argv)
    clock = cpu_timing_setup(args)
    best = cpu_dispatch.cpu_isa()
    paths = cpu_dispatch.ISA_NAMES[: cpu_dispatch.ISA_NAMES.index(best) + 1]
    shapes = [(33, 77)] if args.quick else SHAPES
    rows = bench(shapes, args.p, 3 if args.quick else args.rounds, paths, clock)
    info = device_info("cpu")
    info["cpu_features"] = cpu_dispatch.cpu_features()
    print(f"# {info['device']} | torch {info['torch']} | threads {info['threads']} | "
          f"{' '.join(info['cpu_features'])} | p {args.p}")
    print(f"{'tokens x features':>18} {'dtype':>8} {'path':>11} {'seeded us':>10} "
          f"{'F.dropout':>10} {'mask path':>10} {'F.dropout/ours':>14} {'mask/ours':>9}")
    for r in rows:
        print(f"{'%d x %d' % tuple(r['shape']):>18} {r['dtype']:>8} {r['path']:>11} "
              f"{r['seeded_us']:>10.1f} {r['torch_dropout_us']:>10.1f} {r['saved_mask_us']:>10.1f} "
              f"{r['torch_dropout_over_seeded']:>14.2f} {r['saved_mask_over_seeded']:>9.2f}")
    if args.json:
        write_json(args.json, {"info": info, "dropout": rows})
    return rows


if __name__ == "__main__":
    main()
