"""One QLoRA training step on a stack of real LLaMA decoder blocks, against bf16 + LoRA.

A ``transformers`` LlamaModel built from a config (no download; decoder blocks sized to fit
the device, a tiny vocabulary since inputs are embeddings) is converted two ways:

* **qlora**: ``prepare_model`` all-linear, NF4 + double quant, r=64, compute in float32 on
  the CPU (the fastest correct path there) or bf16 on a GPU, ``qk.optim.PagedAdamW``;
* **bf16 LoRA**: the same model in bf16 with LoRA (r=64) over the dense layers
  (``prepare_model(quantize=False)``), ``torch.optim.AdamW``.

For each: tokens/s of one full step (forward, backward, optimizer step; median after
warm-up) and peak memory: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the
resident parameters/buffers/optimizer state plus the peak of what the step allocates (the
PyTorch profiler's allocation log, see bench_lora.py).

Usage: python benchmarks/bench_train_step.py [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from benchmarks.bench_lora import allocation_trace  # noqa: E402
from benchmarks.timing import device_info, median_time, write_json  # noqa: E402


def build(kind: str, cfg: dict, device: str, r: int):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq"])
    model = LlamaModel(config)
    on_gpu = torch.device(device).type == "cuda"
    if kind == "qlora":
        model.to(device)
        qk.prepare_model(model, r=r, lora_alpha=16,
                         compute_dtype=torch.bfloat16 if on_gpu else torch.float32, verbose=False)
        opt = qk.optim.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        model.to(device=device, dtype=torch.bfloat16)
        qk.prepare_model(model, r=r, lora_alpha=16, quantize=False, verbose=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def resident_bytes(model, opt) -> int:
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for state in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def measure(kind: str, cfg: dict, device: str, r: int, reps: int) -> dict:
    model, opt = build(kind, cfg, device, r)
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"], device=device, dtype=dtype)

    def step():
        out = model(inputs_embeds=x).last_hidden_state
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    t = median_time(step, device, warmup=1, reps=reps)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        _, transient, _ = allocation_trace(step)
        peak = resident_bytes(model, opt) + transient
    tokens = cfg["batch"] * cfg["seq"]
    return {"kind": kind, "step_s": t, "tokens_per_s": tokens / t, "peak_bytes": peak,
            "resident_bytes": resident_bytes(model, opt)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    if args.quick:
        cfg = dict(hidden=256, inter=688, layers=2, heads=4, seq=64, batch=1)
    elif on_gpu:
        cfg = dict(hidden=4096, inter=11008, layers=4, heads=32, seq=2048, batch=1)
    else:  # bf16 matmuls crawl on CPUs without native bf16: keep the baseline affordable
        cfg = dict(hidden=512, inter=1376, layers=2, heads=8, seq=128, batch=2)
    r = 8 if args.quick else 64
    rows = [measure(kind, cfg, args.device, r, 1 if args.quick else args.reps)
            for kind in ("qlora", "bf16_lora")]
    q, b = rows
    info = device_info(args.device)
    print(f"# {info['device']} | torch {info['torch']} | {info['date']} | blocks {cfg} r={r}")
    for row in rows:
        print(f"{row['kind']:>10}: {row['tokens_per_s']:8.1f} tokens/s, peak {row['peak_bytes'] / 2**20:8.1f} MiB "
              f"(resident {row['resident_bytes'] / 2**20:.1f} MiB)")
    ratios = {"tokens_per_s_qlora_over_bf16": q["tokens_per_s"] / b["tokens_per_s"],
              "peak_memory_qlora_over_bf16": q["peak_bytes"] / b["peak_bytes"]}
    print(f"qlora / bf16 LoRA: speed x{ratios['tokens_per_s_qlora_over_bf16']:.2f}, "
          f"peak memory x{ratios['peak_memory_qlora_over_bf16']:.2f}")
    result = {"info": info, "config": cfg, "r": r, "rows": rows, "ratios": ratios}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
