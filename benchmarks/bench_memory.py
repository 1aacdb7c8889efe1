"""Memory of loading a LLaMA-shaped checkpoint into 4-bit, and of one QLoRA step on it.

Writes a checkpoint with random bf16 weights (``--shape 1b``: TinyLlama-1.1B, 2.2 GB;
``--shape 7b``: LLaMA-2-7B, 13.5 GB) in safetensors shards of 2 GB to a temporary
directory (removed afterwards), then measures, each in its own process:

* ``load``: peak RSS and time of ``qk.from_pretrained`` into NF4 + double quantization
  (compute dtype bf16), the RSS the runtime itself holds after its imports, and the final
  model's bytes; MB/s of checkpoint read;
* ``step``: peak RSS of one QLoRA training step on it (batch 1, 512 tokens, r=64
  all-linear, gradient checkpointing, ``qk.optim.PagedAdamW``), beside
  ``qk.estimate_memory``'s figure for the same configuration; ``prepare_model``'s defaults,
  so on the CPU with selective checkpointing (faster, and it keeps every 4-bit layer's
  output for the backward);
* ``step_full``: the same step recomputing everything (``selective_checkpointing=False``),
  the least memory;
* ``bnb``: transformers + bitsandbytes' load of the same checkpoint (when installed);
* ``rates``: the disk's raw read rate of the largest shard (dropped from the page cache
  first) and ``qk.quantize_4bit``'s rate per CPU path, the two halves of a load's time.

On CUDA (``--device cuda``) the peaks are ``torch.cuda.max_memory_allocated``.
The checkpoint was just written, so its pages are likely in the page cache: the MB/s is
then the load's own speed, an upper bound on a cold disk's.

Usage: python benchmarks/bench_memory.py [--shape 1b|7b|tiny] [--device cpu] [--json out.json]
       [--skip step,step_full,bnb,rates] [--dir DIR (written there and kept if missing)]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    # for the test suite: the whole pipeline in seconds
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
}
SHARD_BYTES = 2 * 10**9
GIB = 2**30


def _config(shape: str):
    from transformers import LlamaConfig
    return LlamaConfig(tie_word_embeddings=False, dtype="bfloat16", **SHAPES[shape])


def write_checkpoint(shape: str, directory: str) -> int:
    """Random bf16 weights (std 0.02, norms 1), generated one tensor at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from qlora_kernels.loading import params_on_meta

    config = _config(shape)
    with params_on_meta():
        meta = LlamaForCausalLM(config)
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    shards, cur, size, total = [], {}, 0, 0
    names = [(n, p.shape) for n, p in meta.named_parameters()]
    for i, (name, shp) in enumerate(names):
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)
        cur[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES or i == len(names) - 1:
            shards.append(cur)
            fname = f"model-{len(shards):05d}.safetensors"
            save_file(cur, os.path.join(directory, fname), metadata={"format": "pt"})
            total += size
            cur, size = {}, 0
            shards[-1] = (fname, list(shards[-1]))
    weight_map = {}
    for i, (fname, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(directory, fname), os.path.join(directory, final))
        weight_map.update({k: final for k in keys})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


# ---------------------------------------------------------------------------- children
def _peak(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    # VmHWM: this process image's own peak RSS (ru_maxrss would include the parent's peak,
    # which Linux carries across fork and exec)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model_bytes(model) -> int:
    from qlora_kernels.prepare import weight_bytes
    return weight_bytes(model)


def child_load(directory: str, device: str) -> dict:
    import transformers  # noqa: F401  (imports belong to the runtime's own share)
    import qlora_kernels as qk
    base = _peak(device)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):  # verbose: the read / quantize / other split
        model = qk.from_pretrained(directory, device=device, progress=False,
                                   compute_dtype="bfloat16", verbose=True)
    return {"seconds": time.perf_counter() - t0, "peak": _peak(device), "runtime": base,
            "model_bytes": _model_bytes(model), "split": log.getvalue().strip()}


def child_step(directory: str, device: str, selective="auto") -> dict:
    import transformers  # noqa: F401
    import qlora_kernels as qk
    base = _peak(device)
    model = qk.from_pretrained(directory, device=device, progress=False, compute_dtype="bfloat16",
                               r=64, lora_alpha=16, selective_checkpointing=selective)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = qk.optim.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - t0, "peak": _peak(device), "runtime": base,
            "model_bytes": _model_bytes(model), "loss": float(loss)}


def child_bnb(directory: str, device: str) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    import qlora_kernels  # noqa: F401  (same imports as the load child)
    base = _peak(device)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        directory, device_map=device, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    return {"seconds": time.perf_counter() - t0, "peak": _peak(device), "runtime": base,
            "model_bytes": _model_bytes(model)}


def child_rates(directory: str, device: str) -> dict:
    """The two rates a load is made of: the disk's raw read of the largest shard (its
    pages dropped from the page cache first with POSIX_FADV_DONTNEED, so read from the
    disk where the kernel honours it) and qk.quantize_4bit (NF4 + DQ) of a random bf16
    weight of the checkpoint's largest quantized shape, on each CPU path this CPU has."""
    import qlora_kernels as qk
    from qlora_kernels import cpu_dispatch
    from qlora_kernels.loading import open_checkpoint

    shards = [os.path.join(directory, f) for f in os.listdir(directory)
              if f.endswith(".safetensors")]
    shard = max(shards, key=os.path.getsize)
    fd = os.open(shard, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf, done = memoryview(bytearray(64 << 20)), 0
        t0 = time.perf_counter()
        while (got := os.preadv(fd, [buf], done)) > 0:
            done += got
        disk = done / (time.perf_counter() - t0)
    finally:
        os.close(fd)
    ckpt = open_checkpoint(directory)
    shape = max((ckpt.shape(k) for k in ckpt.keys() if k.endswith("proj.weight")),
                key=lambda s: s[0] * s[1])
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    out = {"disk_bytes_per_s": disk, "quantize_shape": list(shape)}
    best = cpu_dispatch.cpu_isa()
    for isa in ("avx2", "avx512"):
        if device != "cpu" or isa not in cpu_dispatch.ISA_NAMES[: cpu_dispatch.ISA_NAMES.index(best) + 1]:
            continue
        cpu_dispatch.set_cpu_isa(isa)
        times = []
        for _ in range(6):  # the first is warm-up
            t0 = time.perf_counter()
            qk.quantize_4bit(w, quant_type="nf4", double_quant=True)
            times.append(time.perf_counter() - t0)
        out[f"quantize_{isa}_bytes_per_s"] = w.numel() * 2 / sorted(times[1:])[2]
    cpu_dispatch.set_cpu_isa(None)
    return out


CHILDREN = {"load": child_load, "step": child_step, "bnb": child_bnb, "rates": child_rates,
            "step_full": lambda directory, device: child_step(directory, device, False)}


def run_child(kind: str, directory: str, device: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind,
                          "--dir", directory, "--device", device],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate_gib(shape: str, selective: bool) -> float:
    """``qk.estimate_memory`` for the step's configuration, from the checkpoint's config
    (embedding and untied head in bf16, chunked loss, selective checkpointing or not)."""
    import qlora_kernels as qk
    est = qk.estimate_memory(config=_config(shape), r=64, seq_len=512, batch_size=1,
                             selective_checkpointing=selective)
    return est.total_gb * 1e9 / GIB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--skip", default="", help="comma-separated: step, step_full, bnb, rates")
    ap.add_argument("--dir", help="use this checkpoint instead of a temporary one (written "
                    "there and kept when DIR does not exist)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.dir, args.device)))
        return
    from benchmarks.timing import device_info, optional_bitsandbytes, write_json

    skip = set(filter(None, args.skip.split(",")))
    tmp = None
    directory = args.dir
    results = {"shape": args.shape, "device": device_info(args.device)}
    try:
        if directory is None or not os.path.exists(directory):
            if directory is None:
                tmp = directory = tempfile.mkdtemp(prefix=f"qk-bench-{args.shape}-")
            else:
                os.makedirs(directory)
            t0 = time.perf_counter()
            nbytes = write_checkpoint(args.shape, directory)
            print(f"wrote {nbytes / GIB:.2f} GiB of bf16 weights in {time.perf_counter() - t0:.0f} s")
        nbytes = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                     if f.endswith(".safetensors"))
        results["checkpoint_bytes"] = nbytes
        kinds = [k for k in ("rates", "load", "step", "step_full", "bnb")
                 if k == "load" or k not in skip]
        if "bnb" in kinds and optional_bitsandbytes() is None:
            kinds.remove("bnb")
        for kind in kinds:
            r = run_child(kind, directory, args.device)
            results[kind] = r
            if "error" in r:
                print(f"{kind:5s}: failed: {r['error']}")
                continue
            if kind == "rates":
                print(f"rates: disk read of the largest shard {r['disk_bytes_per_s'] / 1e6:.0f} MB/s; "
                      + ", ".join(f"quantize_4bit {k.split('_')[1]} {v / 1e6:.0f} MB/s"
                                  for k, v in r.items() if k.startswith("quantize_") and k != "quantize_shape")
                      + f" (bf16 {r['quantize_shape']}, NF4 + DQ)")
                continue
            extra = r["peak"] - r["runtime"]
            line = (f"{kind}: peak {r['peak'] / GIB:6.2f} GiB, runtime's own "
                    f"{r['runtime'] / GIB:.2f} GiB, peak - runtime {extra / GIB:6.2f} GiB, "
                    f"model {r['model_bytes'] / GIB:.2f} GiB, {r['seconds']:6.1f} s")
            if kind in ("load", "bnb"):
                line += f", {nbytes / 1e6 / r['seconds']:.0f} MB/s"
                line += f"; peak - runtime - model = {(extra - r['model_bytes']) / GIB:.2f} GiB"
            print(line)
            if r.get("split"):
                print(f"       {r['split']}")
        for kind in ("step", "step_full"):
            if kind not in kinds or "error" in results[kind]:
                continue
            # prepare_model's "auto" turns selective checkpointing on for a model on the CPU
            est = estimate_gib(args.shape, kind == "step" and args.device == "cpu")
            results[kind]["estimate_gib"] = est
            meas = (results[kind]["peak"] - results[kind]["runtime"]) / GIB
            print(f"{kind}: peak - runtime {meas:.2f} GiB vs estimate_memory {est:.2f} GiB "
                  f"({100 * (meas / est - 1):+.0f}%)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
