"""transformers Trainer + PEFT QLoRA on the demo's model: our quantizer against bitsandbytes.

Runs examples/hf_trainer_qlora.py once per backend, each in its own process (so peak RSS
is that configuration's own): ``qlora_kernels`` (``qlora_kernels.hf.QuantizationConfig``,
``qk.optim.PagedAdamW``) and, when bitsandbytes is installed, ``bitsandbytes``
(``BitsAndBytesConfig`` NF4 + double quant, ``bnb.optim.PagedAdamW``). Same model, data,
LoRA config (r=16, all-linear), batch and gradient checkpointing. Reports tokens/s (median
step after 3 warm-up steps), peak RSS (``ru_maxrss``) and the ratios ours / bitsandbytes.

Usage: python benchmarks/bench_hf_trainer.py [--steps 8] [--batch-size 2] [--seq-len 64]
       [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import device_info, optional_bitsandbytes, write_json  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "hf_trainer_qlora.py")


def run_one(backend: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, backend + ".json")
    cmd = [sys.executable, EXAMPLE, "--backend", backend, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--out", os.path.join(tmp, backend), "--json", out]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} run failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    backends = ["qlora_kernels"] + (["bitsandbytes"] if optional_bitsandbytes() else [])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_hf_trainer.") as tmp:
        for backend in backends:
            rows[backend] = run_one(backend, args, tmp)
    print(f"{'backend':<14} {'tokens/s':>9} {'step s':>8} {'load s':>7} {'RSS load MiB':>13} "
          f"{'peak RSS MiB':>13} {'loss first->last':>17}")
    for name, r in rows.items():
        print(f"{name:<14} {r['tokens_per_s']:9.1f} {r['median_step_s']:8.2f} {r['load_s']:7.1f} "
              f"{r['rss_after_load_mib']:13.0f} {r['peak_rss_mib']:13.0f} "
              f"{r['first_loss'] or float('nan'):8.3f}->{r['last_loss'] or float('nan'):.3f}")
    if "bitsandbytes" in rows:
        ours, bnb = rows["qlora_kernels"], rows["bitsandbytes"]
        print(f"ours/bnb: tokens/s x{ours['tokens_per_s'] / bnb['tokens_per_s']:.2f}, "
              f"peak RSS x{ours['peak_rss_mib'] / bnb['peak_rss_mib']:.2f}")
    if args.json:
        write_json(args.json, {"device": device_info("cpu"), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
