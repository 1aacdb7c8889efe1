"""Extra memory of forward + backward through QLoRALinear vs a LoRA over a dense bf16 layer.

Layer 4096x4096, r=64, 512 tokens of bf16 input that requires grad (as inside a model);
QLoRA: ``QLoRALinear(Linear4bit(nf4, double quant, compute bf16))``; baseline:
``QLoRALinear(nn.Linear bf16)`` with the same bf16 adapters.

Method (CPU, no timing involved): the PyTorch profiler with ``profile_memory=True`` records
every allocation and free of the CPU allocator with a timestamp, including those inside
custom ops (the transient dequantized weight) and kernels. Summing them in time order gives
the live bytes allocated since the start of a window; its maximum is the window's peak.
One window covers forward and backward (the profiler does not report frees of tensors
allocated before its window), split at the end of a ``record_function`` annotation:

* ``held_between``: bytes still allocated at the end of forward (activations saved for
  backward + the output), i.e. what lives between forward and backward;
* ``peak_fwd``: peak during forward; ``peak_fwd_bwd``: peak over forward and backward
  (it includes the gradient of x and of A and B, and the ones_like output gradient);
* ``saved_for_backward``: bytes of the tensors autograd saved (``saved_tensors_hooks``),
  not counting tensors that are the layer's own parameters/buffers (resident anyway);
* ``weights``: resident bytes of the layer (parameters + buffers), for reference.

Usage: python benchmarks/bench_lora.py [--json out.json] [--tokens 512] [--dim 4096] [--r 64]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from benchmarks.timing import device_info, median_time, write_json  # noqa: E402


def _memory_events(prof):
    return sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]")


def _peak(events, until=None):
    live = peak = 0
    for t, nbytes in events:
        if until is not None and t > until:
            break
        live += nbytes
        peak = max(peak, live)
    return peak, live


def allocation_trace(fn):
    """Run fn() under the profiler; return (fn(), peak, final): the peak and final live bytes
    allocated (minus freed) by the CPU allocator during the call. Frees of tensors that
    existed before the call are not reported by the profiler, so ``final`` only counts
    what the call allocated.

    Example:
        >>> import torch
        >>> _, peak, final = allocation_trace(lambda: torch.ones(1024).sum())
        >>> peak >= 4096
        True
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return (out, *_peak(_memory_events(prof)))


def _layer_bytes(layer):
    return sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))


def measure(layer, x):
    """The figures of one forward + backward (see the module docstring), in bytes."""
    resident = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    saved = {}

    def pack(t):
        if t.data_ptr() not in resident:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    # One profiler window for forward and backward (so frees in backward of what forward
    # allocated are seen); the end of the "forward" annotation splits it.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("qk_bench_forward"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = layer(x)
        out_bytes = y.numel() * y.element_size()
        y.backward(torch.ones_like(y))
        del y
    events = _memory_events(prof)
    fwd_end = max(e.end_ns() for e in prof.profiler.kineto_results.events()
                  if e.name() == "qk_bench_forward")
    peak_fwd, held = _peak(events, until=fwd_end)
    peak_all, _ = _peak(events)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return {"weights": _layer_bytes(layer), "saved_for_backward": sum(saved.values()),
            "output": out_bytes, "held_between": held, "peak_fwd": peak_fwd,
            "peak_fwd_bwd": peak_all}


def fwd_bwd_ms(layer, x, reps: int = 3) -> float:
    """Median ms of one forward + backward (grad of x, A and B) through ``layer``."""
    def step():
        layer(x).float().sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return median_time(step, "cpu", warmup=1, reps=reps) * 1e3


def build(kind: str, dim: int, r: int):
    torch.manual_seed(0)
    lin = torch.nn.Linear(dim, dim, bias=False, dtype=torch.bfloat16)
    if kind == "qlora":
        base = qk.Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
        del lin
    else:
        base = lin
    layer = qk.QLoRALinear(base, r=r, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.01)
    return layer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args(argv)
    rows = {}
    for kind in ("qlora", "bf16"):
        layer = build(kind, args.dim, args.r)
        # warm-up on 8 tokens (same paths): one-time allocations (thread pools) not counted
        measure(layer, torch.randn(8, args.dim, dtype=torch.bfloat16, requires_grad=True))
        x = torch.randn(args.tokens, args.dim, dtype=torch.bfloat16, requires_grad=True)
        rows[kind] = measure(layer, x)
        rows[kind]["fwd_bwd_ms"] = fwd_bwd_ms(layer, x)
        print(f"# {kind} done", flush=True)
        del layer
    info = device_info("cpu")
    mib = 2 ** 20
    print(f"# {info['device']} | torch {info['torch']} | threads {info['threads']} | {info['date']}")
    print(f"# QLoRALinear {args.dim}x{args.dim}, r={args.r}, {args.tokens} tokens, bf16 input; MiB")
    keys = ["weights", "saved_for_backward", "held_between", "peak_fwd", "peak_fwd_bwd"]
    print(f"{'layer':>8} " + " ".join(f"{k:>18}" for k in keys) + f" {'fwd+bwd ms':>11}")
    for kind, row in rows.items():
        print(f"{kind:>8} " + " ".join(f"{row[k] / mib:>18.2f}" for k in keys)
              + f" {row['fwd_bwd_ms']:>11.1f}")
    if args.json:
        write_json(args.json, {"info": info, "dim": args.dim, "r": args.r,
                               "tokens": args.tokens, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
