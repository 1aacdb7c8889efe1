"""transformers Trainer + PEFT QLoRA on the demo's model: our quantizer against bitsandbytes.

Runs examples/hf_trainer_qlora.py once per backend, each in its own process (so peak RSS
is that configuration's own): ``qlora_kernels`` (``qlora_kernels.hf.QuantizationConfig``,
``qk.optim.PagedAdamW``) and, when bitsandbytes is installed, ``bitsandbytes``
(``BitsAndBytesConfig`` NF4 + double quant, ``bnb.optim.PagedAdamW``). Same model, data,
LoRA config (r=16, all-linear), batch and gradient checkpointing. Reports tokens/s (median
step after 3 warm-up steps), peak RSS (``ru_maxrss``) and the ratios ours / bitsandbytes.

``--load`` measures loading instead: the peak RSS of
``AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantizationConfig(...))``
against ``qk.from_pretrained`` (issue 16's streaming loader) and, when installed,
transformers + bitsandbytes, on the same random bf16 checkpoint written by
bench_memory.py (``--shape 1b``: TinyLlama-1.1B-shaped), each in its own process, NF4 +
double quant, compute dtype bf16 (bench_memory.py's children for the other two).

Usage: python benchmarks/bench_hf_trainer.py [--steps 8] [--batch-size 2] [--seq-len 64]
       [--json out.json]
       python benchmarks/bench_hf_trainer.py --load [--shape 1b|tiny] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

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


# ---------------------------------------------------------------------------- --load
def child_hf_load(directory: str, device: str) -> dict:
    """Our transformers quantizer's load, measured like bench_memory's children."""
    import torch
    from transformers import AutoModelForCausalLM

    import qlora_kernels.hf as qkhf
    from benchmarks.bench_memory import _model_bytes, _peak

    base = _peak(device)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        directory, device_map=device, dtype=torch.bfloat16,
        quantization_config=qkhf.QuantizationConfig(quant_type="nf4", double_quant=True,
                                                    compute_dtype=torch.bfloat16))
    return {"seconds": time.perf_counter() - t0, "peak": _peak(device), "runtime": base,
            "model_bytes": _model_bytes(model)}


def _load_children() -> dict:
    from benchmarks import bench_memory
    return {"qk.from_pretrained": bench_memory.child_load, "hf quantizer": child_hf_load,
            "hf bitsandbytes": bench_memory.child_bnb}


def _import_runtime() -> None:
    """The same imports in every load child, before its baseline is read, so that each
    child's "runtime" share is the same and the peaks compare directly."""
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import qlora_kernels.hf  # noqa: F401
    optional_bitsandbytes()


def run_load_child(kind: str, directory: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--load-child", kind,
                          "--dir", directory], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_load(args) -> dict:
    from benchmarks.bench_memory import GIB, write_checkpoint

    kinds = list(_load_children())
    if optional_bitsandbytes() is None:
        kinds.remove("hf bitsandbytes")
    results = {"shape": args.shape, "device": device_info("cpu"), "rows": {}}
    tmp = tempfile.mkdtemp(prefix=f"qk-bench-hf-load-{args.shape}-")
    try:
        t0 = time.perf_counter()
        nbytes = write_checkpoint(args.shape, tmp)
        print(f"wrote {nbytes / GIB:.2f} GiB of bf16 weights ({args.shape}) in "
              f"{time.perf_counter() - t0:.0f} s")
        print(f"{'loader':<19} {'peak GiB':>8} {'runtime GiB':>11} {'model GiB':>9} "
              f"{'peak-runtime-model GiB':>22} {'seconds':>8}")
        for kind in kinds:
            r = results["rows"][kind] = run_load_child(kind, tmp)
            if "error" in r:
                print(f"{kind:<19} failed: {r['error']}")
                continue
            over = (r["peak"] - r["runtime"] - r["model_bytes"]) / GIB
            print(f"{kind:<19} {r['peak'] / GIB:8.2f} {r['runtime'] / GIB:11.2f} "
                  f"{r['model_bytes'] / GIB:9.2f} {over:22.2f} {r['seconds']:8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json(args.json, results)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--load", action="store_true", help="measure loading instead of training")
    p.add_argument("--shape", default="1b", help="--load's checkpoint (bench_memory's shapes)")
    p.add_argument("--load-child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_child:
        _import_runtime()
        print(json.dumps(_load_children()[args.load_child](args.dir, "cpu")))
        return None
    if args.load:
        return main_load(args)
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
