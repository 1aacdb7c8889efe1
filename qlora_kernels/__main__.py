"""Command line: ``qlora-kernels <command>`` (also ``python -m qlora_kernels <command>``).

Commands:
  train    QLoRA fine-tuning of a local model (GGUF or transformers directory) on JSONL
           data: checkpoints, exact --resume, eval, log.jsonl, loss.png
  merge    fold an adapter into its base: a dense transformers model (or --quantized)
  generate chat generation on the 4-bit base with an adapter, streamed
  demo     the main job: QLoRA on SmolLM2-135M-Instruct end to end (memory and
           perplexity tables, fine-tune, adapter, report)
  memory   the QLoRA memory table for a model size (``--params 65e9``)
  bench    every benchmark (``python -m benchmarks``; e.g. ``bench --quick``)
  info     the CPU's features, the path each CPU kernel takes, the GEMV/GEMM thresholds
  calibrate  measure this machine's GEMV/GEMM switch now and cache it (``--threads N``)

Example:
    $ python -m qlora_kernels demo
"""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _train(args) -> int:
    from .train.command import main as train_main

    return train_main(args)


def _merge(args) -> int:
    from .train.merge import main as merge_main

    return merge_main(args)


def _generate(args) -> int:
    from .train.generate import main as generate_main

    return generate_main(args)


def _size_label(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _memory(args) -> int:
    import qlora_kernels as qk
    from qlora_kernels.memory import check_memory_args

    try:
        for n in args.params:
            check_memory_args(n, args.r, args.world_size)
    except ValueError as exc:
        print(f"qlora-kernels memory: error: --{exc}", file=sys.stderr)
        return 2
    print(f"{'params':>8} {'bf16 GB':>8} {'NF4 GB':>7} {'NF4+DQ GB':>9} {'LoRA params':>12} "
          f"{'LoRA+grad GB':>12} {'AdamW GB':>9} {'total GB':>9}")
    for n in args.params:
        e = qk.estimate_memory(n, r=args.r, world_size=args.world_size)
        print(f"{_size_label(n):>8} {e.weights_bf16_gb:>8.2f} {e.weights_nf4_gb:>7.2f} "
              f"{e.weights_nf4_dq_gb:>9.2f} {_size_label(e.lora_params):>12} "
              f"{e.lora_weights_gb + e.lora_grads_gb:>12.2f} {e.optimizer_gb:>9.2f} "
              f"{e.total_gb:>9.1f}")
    return 0


def _info(args) -> int:
    import qlora_kernels as qk

    qk.info()
    return 0


def _calibrate(args) -> int:
    import os

    import torch

    from qlora_kernels import gemv_calibration

    if args.threads:
        torch.set_num_threads(args.threads)
    if gemv_calibration.machine_busy():
        print(f"qlora-kernels calibrate: warning: load average {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} CPUs: other work will be in the timings; calibrate again "
              "when the machine is idle", file=sys.stderr)
    try:
        entry = gemv_calibration.calibrate_gemv()
    except RuntimeError as exc:
        print(f"qlora-kernels calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(f"GEMV/GEMM calibration, {torch.get_num_threads()} threads, NF4 + double-quant "
          f"{'x'.join(map(str, entry['shape']))} weight: {entry['seconds']:.2f} s "
          f"({entry['cpu_seconds']:.2f} s of CPU, load average {entry['load_average']}), cached in "
          f"{gemv_calibration.cache_path()}")
    for dt, timings in entry["timings_ms"].items():
        print(f"  {dt}: GEMV up to {entry['gemv_max_rows'][dt]} rows  (rows: GEMV ms / GEMM ms  "
              + "  ".join(f"{m}: {a:.2f}/{b:.2f}" for m, a, b in timings) + ")")
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
    from .train.args import add_train_arguments
    from .train.generate import add_generate_arguments
    from .train.merge import add_merge_arguments

    for name, helptext, add, func in (
            ("train", "QLoRA fine-tuning on JSONL data", add_train_arguments, _train),
            ("merge", "merge an adapter into a dense (or re-quantized) model", add_merge_arguments, _merge),
            ("generate", "chat generation with an adapter", add_generate_arguments, _generate)):
        cmd = sub.add_parser(name, help=helptext)
        add(cmd)
        cmd.set_defaults(func=func)
    demo = sub.add_parser("demo", help="QLoRA on a real pretrained model, end to end")
    from .demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=_demo)
    mem = sub.add_parser("memory", help="QLoRA memory table (weights, LoRA, optimizer state)")
    mem.add_argument("--params", type=float, nargs="+", default=[7e9, 13e9, 33e9, 65e9])
    mem.add_argument("--r", type=int, default=64)
    mem.add_argument("--world-size", type=int, default=1)
    mem.set_defaults(func=_memory)
    sub.add_parser("info", help="CPU features, kernel paths, GEMV/GEMM thresholds"
                   ).set_defaults(func=_info)
    cal = sub.add_parser("calibrate", help="measure this machine's GEMV/GEMM switch and cache it")
    cal.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    cal.set_defaults(func=_calibrate)
    sub.add_parser("bench", help="run the benchmarks (python -m benchmarks; same options)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options belong to the harness
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
