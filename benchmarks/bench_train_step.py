"""One QLoRA training step on a stack of real LLaMA decoder blocks, against bf16 + LoRA.

A ``transformers`` LlamaModel built from a config (no download; decoder blocks sized to fit
the device, a tiny vocabulary since inputs are embeddings) is converted two ways:

* **qlora**: ``prepare_model`` all-linear, NF4 + double quant, r=64, compute dtype "auto"
  (bf16 on GPUs and CPUs with native bf16, float32 on other CPUs), ``qk.optim.PagedAdamW``;
* **bf16 LoRA**: the same model in bf16 with LoRA (r=64) over the dense layers
  (``prepare_model(quantize=False)``), ``torch.optim.AdamW``.

For each: tokens/s of one full step (forward, backward, optimizer step; median after
warm-up) and peak memory: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the
resident parameters/buffers/optimizer state plus the peak of what the step allocates (the
PyTorch profiler's allocation log, see bench_lora.py).

Usage: python benchmarks/bench_train_step.py [--json out.json] [--quick]

``--model`` instead trains the real SmolLM2-135M-Instruct (the demo's model package): LoRA
r=16, alpha 32 on all 210 decoder linears, non-reentrant gradient checkpointing, AdamW, the
same batches of held-out text (the demo's standard-library docstrings), median step after
two warm-ups, each configuration in its own process, at 4x128 and 1x1024 tokens:

* **ours**: ``prepare_model`` (NF4 + double quant, compute dtype "auto" = bf16 on CPUs with
  native bf16, else float32; the rest of the model in that dtype), ``qk.optim.AdamW``;
* **peft_dense_bf16 / _float32**: PEFT LoRA over the dense model in that dtype;
* **peft_bnb_bf16 / _float32** (when bitsandbytes is installed): transformers'
  ``BitsAndBytesConfig`` NF4 + double quant with that compute dtype, PEFT LoRA.

Peak RSS is the process's resident peak over the steps (reset after loading, so the
GGUF/safetensors load is not counted); ``VmHWM`` after ``/proc/self/clear_refs``. Besides
wall-clock tokens/s, tokens per CPU-second (the process's CPU time, which a machine loaded
by other work disturbs far less; meaningful with ``--threads 1``).

Usage: python benchmarks/bench_train_step.py --model [--shapes 4x128 1x1024] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from benchmarks.bench_lora import allocation_trace  # noqa: E402
from benchmarks.timing import (device_info, median_time, optional_bitsandbytes,  # noqa: E402
                               write_json)
# the training loop's own switch (non-reentrant checkpointing), imported here so that
# importing this file (tests/test_benchmarks.py) checks it still exists
from qlora_kernels.train.loop import _checkpointing  # noqa: E402


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
                         compute_dtype=qk.compute_dtype.resolve_compute_dtype("auto", device), verbose=False)
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


MODEL_CONFIGS = ("ours", "peft_dense_bf16", "peft_dense_float32", "peft_bnb_bf16",
                 "peft_bnb_float32")
# Ablations of "ours" for the ladder: bf16 compute with the GEMM path's dense GEMM in
# float32 (the CPU path capped at avx512, i.e. no native bf16: the GEMM before this change),
# without the chunked LM-head loss, and with full recompute under gradient checkpointing
# (no selective checkpointing: every 4-bit GEMM and attention re-run in the backward), and
# with torch's allocator left as it is (no CPU block cache).
ABLATIONS = ("ours_float32_gemm", "ours_no_chunked_loss", "ours_full_recompute",
             "ours_no_block_cache")


def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _build_model(config: str):
    """(model, optimizer, compute dtype) for one configuration of the SmolLM2 benchmark."""
    from qlora_kernels.demo.model import load_model, _cache_dir, find_gguf

    lm, tok, _ = load_model(dtype=torch.float32)
    if config.startswith("ours"):
        dtype = qk.compute_dtype.resolve_compute_dtype("auto", "cpu")
        if config == "ours_float32_gemm":
            dtype = torch.bfloat16
            qk.cpu_dispatch.set_cpu_isa("avx512")
        lm.to(dtype)
        qk.prepare_model(lm, r=16, lora_alpha=32, compute_dtype=dtype, verbose=False,
                         chunked_loss=config != "ours_no_chunked_loss",
                         selective_checkpointing=config != "ours_full_recompute",
                         cpu_block_cache=config != "ours_no_block_cache")
        params = [p for p in lm.parameters() if p.requires_grad]
        return lm, tok, qk.optim.AdamW(params, lr=1e-4), dtype
    import peft

    dtype = torch.bfloat16 if config.endswith("bf16") else torch.float32
    if config.startswith("peft_bnb"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        del lm
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        lm = AutoModelForCausalLM.from_pretrained(str(_cache_dir(find_gguf())), dtype=dtype,
                                                  quantization_config=bnb)
    else:
        lm.to(dtype)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    lm = peft.get_peft_model(lm, lora)
    lm.enable_input_require_grads()
    params = [p for p in lm.parameters() if p.requires_grad]
    return lm, tok, torch.optim.AdamW(params, lr=1e-4), dtype


def run_one(config: str, batch: int, seq: int, steps: int) -> dict:
    """One configuration, in this process: tokens/s (median step) and peak RSS."""
    from qlora_kernels.demo.data import perplexity_tokens

    lm, tok, opt, dtype = _build_model(config)
    n_lora = sum(1 for n, _ in lm.named_modules() if n.endswith("lora_A"))
    _checkpointing(lm, True)
    lm.config.use_cache = False
    lm.train()
    ids = perplexity_tokens(tok, batch * seq * (steps + 2)).view(steps + 2, batch, seq)
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS of the steps, not of the load
        f.write("5")
    times, cpu_times = [], []
    for i in range(steps + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = lm(input_ids=ids[i], labels=ids[i], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    step_s, cpu_s = statistics.median(times[2:]), statistics.median(cpu_times[2:])
    return {"config": config, "batch": batch, "seq": seq, "dtype": str(dtype).removeprefix("torch."),
            "lora_layers": n_lora, "step_s": step_s, "tokens_per_s": batch * seq / step_s,
            "step_cpu_s": cpu_s, "tokens_per_cpu_s": batch * seq / cpu_s,
            "threads": torch.get_num_threads(), "peak_rss_bytes": _vm_hwm(),
            "loss": float(loss.detach()), "steps": times, "cpu_steps": cpu_times}


def _median_run(runs: list) -> dict:
    """One configuration's row from its repeated processes: the run with the median
    tokens/CPU-s, with every run's tokens/CPU-s and the highest peak RSS."""
    row = dict(sorted(runs, key=lambda r: r["tokens_per_cpu_s"])[(len(runs) - 1) // 2])
    row["runs_tokens_per_cpu_s"] = [r["tokens_per_cpu_s"] for r in runs]
    row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    return row


def main_model(args) -> dict:
    """Every configuration at every shape, each in its own process."""
    info = device_info("cpu")
    info["cpu_features"] = qk.cpu_dispatch.cpu_features()
    info["cpu_isa"] = qk.cpu_dispatch.cpu_isa()
    configs = [c for c in args.configs
               if not c.startswith("peft_bnb") or optional_bitsandbytes() is not None]
    print(f"# {info['device']} | torch {info['torch']} | threads {args.threads} | "
          f"{info['date']} | features {' '.join(info['cpu_features'])}")
    rows = []
    for shape in args.shapes:
        batch, seq = (int(v) for v in shape.split("x"))
        runs = {config: [] for config in configs}
        for _ in range(args.repeat):  # round-robin, so slow phases of the machine hit all alike
            for config in configs:
                cmd = [sys.executable, os.path.abspath(__file__), "--one", config, "--shapes",
                       shape, "--steps", str(args.steps), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{shape} {config}: failed\n{out.stderr[-2000:]}")
                    continue
                runs[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for config, done in runs.items():
            if not done:
                continue
            row = _median_run(done)
            rows.append(row)
            print(f"{shape:>7} {config:>18} ({row['dtype']}): {row['tokens_per_s']:7.1f} tokens/s, "
                  f"{row['tokens_per_cpu_s']:7.1f} tokens/CPU-s, peak RSS "
                  f"{row['peak_rss_bytes'] / 2**30:5.2f} GiB, loss {row['loss']:.3f}"
                  + (f" (runs: {' '.join(f'{v:.1f}' for v in row['runs_tokens_per_cpu_s'])})"
                     if len(done) > 1 else ""), flush=True)
        ours = [r for r in rows if r["config"] == "ours" and r["batch"] == batch]
        for prefix in ("peft_bnb", "peft_dense"):
            them = [r for r in rows if r["config"].startswith(prefix) and r["batch"] == batch]
            if ours and them:
                best = max(them, key=lambda r: r["tokens_per_cpu_s"])
                lowest = min(them, key=lambda r: r["peak_rss_bytes"])
                print(f"{shape:>7} ours / faster {prefix} ({best['config']}): tokens/CPU-s "
                      f"x{ours[0]['tokens_per_cpu_s'] / best['tokens_per_cpu_s']:.2f}, tokens/s "
                      f"x{ours[0]['tokens_per_s'] / best['tokens_per_s']:.2f}; peak RSS / "
                      f"{prefix} lowest x{ours[0]['peak_rss_bytes'] / lowest['peak_rss_bytes']:.2f}",
                      flush=True)
    result = {"info": info, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", action="store_true",
                        help="the real SmolLM2-135M against PEFT (+ bitsandbytes)")
    parser.add_argument("--configs", nargs="+", default=list(MODEL_CONFIGS),
                        choices=MODEL_CONFIGS + ABLATIONS)
    parser.add_argument("--shapes", nargs="+", default=["4x128", "1x1024"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-ups)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="processes per configuration, round-robin; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads in each configuration's process (--model)")
    parser.add_argument("--one", choices=MODEL_CONFIGS + ABLATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        batch, seq = (int(v) for v in args.shapes[0].split("x"))
        print(json.dumps(run_one(args.one, batch, seq, args.steps)))
        return None
    if args.model:
        return main_model(args)
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
