"""Benchmark one optimizer step: qlora_kernels AdamW / AdamW8bit against torch.optim.AdamW.

Every optimizer owns its own copy of the same params; before each timed step all of them get
the same fresh random gradients; the optimizers are timed in turn within each round (so a
load change on the machine hits all of them alike) and the median over rounds after warm-up
is reported, with the median of the per-round ratios to torch's fused AdamW.

On CUDA (``--device cuda``) each step is timed between two synchronizations, and two more
rows appear: ``qk_paged`` (PagedAdamW, states in unified memory that stay on the GPU) and
``qk_paged_out`` (the same, with every state pushed out to host memory before each step, so
the step pays for bringing it back).

Example:
    python benchmarks/bench_optim.py --numel 40000000 --rounds 15 --json results/optim.json
    python benchmarks/bench_optim.py --device cuda --skip-8bit
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from benchmarks.timing import write_json  # noqa: E402


# LoRA A (r x in) and B (out x r) of one LLaMA-7B decoder layer at r=64: q, k, v, o, gate, up, down.
LLAMA7B_LINEARS = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
LORA_R = 64


def lora_sizes(numel: int) -> list:
    """Sizes of the LoRA params of LLaMA-7B (r=64, all linears), layer after layer, until
    ``numel`` elements (the last one cut to fit).

    Example:
        >>> lora_sizes(300000)
        [262144, 37856]
    """
    layer = [n for fan_in, fan_out in LLAMA7B_LINEARS for n in (LORA_R * fan_in, fan_out * LORA_R)]
    sizes, total, i = [], 0, 0
    while total < numel:
        n = min(layer[i % len(layer)], numel - total)
        sizes.append(n)
        total += n
        i += 1
    return sizes


def equal_sizes(numel: int, tensors: int) -> list:
    """``tensors`` sizes summing to ``numel``.

    Example:
        >>> equal_sizes(10, 3)
        [3, 3, 4]
    """
    sizes = [numel // tensors] * tensors
    sizes[-1] += numel - sum(sizes)
    return sizes


def make_optimizers(params_by_name, lr, device="cpu"):
    """name -> optimizer; torch's fused AdamW only if this torch has it for ``device``."""
    opts, notes = {}, []
    try:
        probe = torch.nn.Parameter(torch.zeros(8, device=device))
        probe.grad = torch.ones(8, device=device)
        torch.optim.AdamW([probe], fused=True).step()
        fused_ok = True
    except (RuntimeError, TypeError, ValueError) as exc:
        fused_ok = False
        notes.append(f"torch fused AdamW unavailable on {device} ({exc}); compared with foreach")
    backend = torch.device(device).type
    for name, params in params_by_name.items():
        if name == "torch_fused":
            if fused_ok:
                opts[name] = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
        elif name == "torch_foreach":
            opts[name] = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)
        elif name == "qk_adamw":
            opts[name] = qk.optim.AdamW(params, lr=lr, weight_decay=0.01, backend=backend)
        elif name in ("qk_paged", "qk_paged_out"):
            opts[name] = qk.optim.PagedAdamW(params, lr=lr, weight_decay=0.01, backend=backend)
        elif name == "qk_adamw8bit":
            opts[name] = qk.optim.AdamW8bit(params, lr=lr, weight_decay=0.01, backend=backend)
    return opts, notes


def page_out_(opt) -> int:
    """Push every managed state of ``opt`` to host memory (waits for it); returns how many
    states were managed, so a run that silently fell back to device memory shows up."""
    managed = [t for state in opt.state.values() for t in state.values()
               if torch.is_tensor(t) and qk.optim.paged.is_paged(t)]
    qk.optim.paged.prefetch_(managed, "cpu")
    torch.cuda.synchronize()
    return len(managed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=40_000_000, help="total float32 parameters")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--layout", choices=("lora", "equal"), default="lora",
                    help="lora: the adapter shapes of LLaMA-7B r=64 on all linears, layer after "
                         "layer (14 tensors, 5.0M params per layer: 40M is 113 tensors, 8 layers "
                         "and a bit); equal: --tensors params of equal size")
    ap.add_argument("--tensors", type=int, default=10, help="with --layout equal: how many params")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    ap.add_argument("--skip-8bit", action="store_true")
    ap.add_argument("--json", default=None, help="write results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the same OpenMP runtime runs our kernels

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    if args.layout == "lora":
        sizes = lora_sizes(args.numel)
    else:
        sizes = equal_sizes(args.numel, args.tensors)
    init = [torch.randn(n, generator=gen).to(device) for n in sizes]
    names = ["torch_fused", "torch_foreach", "qk_adamw"]
    names += ["qk_paged", "qk_paged_out"] if on_cuda else []
    names += [] if args.skip_8bit else ["qk_adamw8bit"]
    params_by_name = {k: [torch.nn.Parameter(t.clone()) for t in init] for k in names}
    opts, notes = make_optimizers(params_by_name, lr=1e-4, device=device)
    grads = [torch.empty(n, device=device) for n in sizes]
    dgen = torch.Generator(device=device).manual_seed(1)
    times = {k: [] for k in opts}
    paged_states = {}
    for r in range(args.warmup + args.rounds):
        for g in grads:
            g.normal_(generator=dgen)  # fresh gradients, shared by every optimizer this round
        order = list(opts.items())
        if r % 2:  # alternate the order: no optimizer always runs right after the same one
            order.reverse()
        for name, opt in order:
            for p, g in zip(params_by_name[name], grads):
                p.grad = g
            if name == "qk_paged_out" and r > 0:  # the states exist from the first step on
                paged_states[name] = page_out_(opt)
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt * 1e3)
    if on_cuda:
        paged_states["qk_paged"] = sum(qk.optim.paged.is_paged(t)
                                       for st in opts["qk_paged"].state.values()
                                       for t in st.values() if torch.is_tensor(t))
        for name, count in paged_states.items():
            if count == 0:
                notes.append(f"{name}: no state is in managed memory (this GPU/build has none): "
                             "its times are of ordinary device memory")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = "torch_fused" if "torch_fused" in med else "torch_foreach"
    # per-round ratios: both optimizers saw the same machine load within a round
    paired = {k: statistics.median(a / b for a, b in zip(v, times[base])) for k, v in times.items()}
    result = {
        "numel": args.numel, "tensors": len(sizes), "layout": args.layout, "rounds": args.rounds,
        "warmup": args.warmup, "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else None,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "median_ms": med, "all_ms": times, "baseline": base,
        "ratio_vs_baseline": {k: v / med[base] for k, v in med.items()},
        "paired_ratio_vs_baseline": paired, "managed_states": paged_states, "notes": notes,
    }
    where = (result["device_name"] if on_cuda else f"{torch.get_num_threads()} threads")
    print(f"{args.numel / 1e6:.1f}M float32 params in {len(sizes)} tensors ({args.layout}), "
          f"{where}, median of {args.rounds} steps after "
          f"{args.warmup} warm-up")
    for k, v in med.items():
        print(f"  {k:14s} {v:9.2f} ms   x{v / med[base]:.3f} of {base} "
              f"(median of per-round ratios x{paired[k]:.3f})")
    for n in notes:
        print("  note:", n)
    if args.json:
        write_json(args.json, result, indent=2)
    return result


if __name__ == "__main__":
    main()
