"""Command line: ``qlora-kernels <command>`` (also ``python -m qlora_kernels <command>``).

Commands:
  demo     the main job: quantize a weight, report error and bits per parameter
  memory   the QLoRA memory table for a model size (``--params 65e9``)
  bench    every benchmark (``python -m benchmarks``; e.g. ``bench --quick``)

Example:
    $ python -m qlora_kernels demo
"""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import torch

    import qlora_kernels as qk

    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols, dtype=torch.bfloat16)
    print(f"qlora_kernels {qk.__version__}: extension loaded={qk.EXTENSION_LOADED}, "
          f"CPU backends={qk.available_backends('cpu')}")
    print(f"weight {tuple(w.shape)} {w.dtype}; blocksize {args.blocksize}")
    print(f"{'format':<12} {'bits/param':>10} {'mean |err|':>11} {'rel err':>8} "
          f"{'quant ms':>9} {'dequant ms':>10}")
    for qt in ("nf4", "fp4", "int4"):
        for dq in (False, True):
            t0 = time.perf_counter()
            packed, state = qk.quantize_4bit(w, blocksize=args.blocksize, quant_type=qt,
                                             double_quant=dq)
            t1 = time.perf_counter()
            w_hat = qk.dequantize_4bit(packed, state)
            t2 = time.perf_counter()
            err = (w_hat.float() - w.float()).abs()
            rel = (err / w.float().abs().clamp_min(1e-8)).mean().item()
            name = qt + ("+DQ" if dq else "")
            print(f"{name:<12} {qk.bits_per_parameter(packed, state):>10.3f} "
                  f"{err.mean().item():>11.4f} {rel:>8.3f} {(t1 - t0) * 1e3:>9.1f} "
                  f"{(t2 - t1) * 1e3:>10.1f}")
    return 0


def _memory(args) -> int:
    import qlora_kernels as qk

    print(f"{'params':>8} {'bf16 GB':>8} {'NF4 GB':>7} {'NF4+DQ GB':>9} {'LoRA params':>12} "
          f"{'LoRA+grad GB':>12} {'AdamW GB':>9} {'total GB':>9}")
    for n in args.params:
        e = qk.estimate_memory(n, r=args.r, world_size=args.world_size)
        print(f"{n / 1e9:>7.0f}B {e.weights_bf16_gb:>8.1f} {e.weights_nf4_gb:>7.1f} "
              f"{e.weights_nf4_dq_gb:>9.1f} {e.lora_params / 1e6:>11.0f}M "
              f"{e.lora_weights_gb + e.lora_grads_gb:>12.2f} {e.optimizer_gb:>9.2f} "
              f"{e.total_gb:>9.1f}")
    return 0


def _bench(bench_args) -> int:
    import importlib
    import os

    # benchmarks/ lives beside the package in a checkout (editable install)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        print("qlora-kernels bench runs from a source checkout (benchmarks/ not found)")
        return 2
    sys.path.insert(0, root)
    importlib.import_module("benchmarks.__main__").main(bench_args)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-kernels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a weight; print error and bits per parameter")
    demo.add_argument("--rows", type=int, default=4096)
    demo.add_argument("--cols", type=int, default=4096)
    demo.add_argument("--blocksize", type=int, default=64)
    demo.set_defaults(func=_demo)
    mem = sub.add_parser("memory", help="QLoRA memory table (weights, LoRA, optimizer state)")
    mem.add_argument("--params", type=float, nargs="+", default=[7e9, 13e9, 33e9, 65e9])
    mem.add_argument("--r", type=int, default=64)
    mem.add_argument("--world-size", type=int, default=1)
    mem.set_defaults(func=_memory)
    sub.add_parser("bench", help="run the benchmarks (python -m benchmarks; same options)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options belong to the harness
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
