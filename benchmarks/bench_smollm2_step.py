"""One QLoRA training step of SmolLM2-135M: qlora_kernels against PEFT (+ bitsandbytes).

Variants (``--variant``; run each in its own process, as scripts/gpu_check.py does):

* ``qk``: ``prepare_model`` all-linear, NF4 + double quant, r=16, bf16 compute on a GPU
  (float32 on the CPU), ``qk.optim.PagedAdamW``;
* ``peft``: PEFT LoRA (r=16, all linear layers) on the bf16 model, ``torch.optim.AdamW``
  (fused on a GPU): the dense baseline;
* ``peft_bnb``: PEFT LoRA on the model loaded 4-bit by bitsandbytes (NF4, double quant,
  bf16 compute), when bitsandbytes is installed and ``--model`` is a model directory.

The model: ``--model`` (a ``.gguf`` file, read with transformers + gguf, or a transformers
model directory), else the SmolLM2-135M architecture with random weights (a step's time
does not depend on the weights' values; the JSON says which was used). Input: random
token ids, ``--batch`` x ``--seq``. Reported: median step time after warm-up, tokens/s,
peak GPU memory.

Usage: python benchmarks/bench_smollm2_step.py --variant qk [--model PATH] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import device_info, median_time, write_json  # noqa: E402

VARIANTS = ("qk", "peft", "peft_bnb")
# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True)
LORA_R = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Skip(Exception):
    """This variant cannot run here (the message says why)."""


def load(model_path: str | None, layers: int | None, dtype: torch.dtype, bnb: bool = False,
         vocab: int | None = None):
    """(model, source description). ``bnb``: load 4-bit through bitsandbytes; ``vocab``:
    a smaller vocabulary for the random-weights model (quick CPU runs)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if bnb:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes is not installed")
        if model_path is None or not os.path.isdir(model_path):
            raise Skip("bitsandbytes 4-bit loading needs --model DIR (a transformers model)")
        from transformers import BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=q,
                                                     dtype=dtype, device_map={"": 0})
        source = f"{model_path} (bitsandbytes 4-bit)"
    elif model_path is None:
        torch.manual_seed(0)
        cfg = dict(SMOLLM2_135M)
        if layers is not None:
            cfg["num_hidden_layers"] = layers
        if vocab is not None:
            cfg["vocab_size"] = vocab
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
        source = "SmolLM2-135M architecture, random weights"
    elif model_path.endswith(".gguf"):
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise Skip(f"reading a .gguf file needs {' and '.join(missing)} (not installed)")
        from qlora_kernels.demo.model import load_model
        model, _, info = load_model(model_path, dtype=dtype, layers=layers)
        source = info["path"]
    else:
        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"--model: {model_path} is neither a .gguf file nor a "
                                    "model directory")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        source = model_path
    if layers is not None and len(model.model.layers) > layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model, source


def build(variant: str, model_path, layers, device: torch.device, vocab=None):
    """(model, optimizer, source) ready to train."""
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if variant == "qk":
        import qlora_kernels as qk
        model, source = load(model_path, layers, torch.float32, vocab=vocab)
        model.to(device)
        qk.prepare_model(model, r=LORA_R, lora_alpha=32, compute_dtype=dtype, verbose=False)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, qk.optim.PagedAdamW(params, lr=1e-4), source
    if importlib.util.find_spec("peft") is None:
        raise Skip("peft is not installed")
    from peft import LoraConfig, get_peft_model
    model, source = load(model_path, layers, dtype, bnb=variant == "peft_bnb", vocab=vocab)
    if variant == "peft":
        model.to(device)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=32, target_modules=TARGETS,
                                             lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=on_gpu), source


def measure(variant: str, model_path, layers, device: torch.device, batch: int, seq: int,
            reps: int, vocab=None) -> dict:
    model, opt, source = build(variant, model_path, layers, device, vocab)
    model.train()
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    t = median_time(step, device, warmup=1, reps=reps)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"variant": variant, "model": source, "layers": model.config.num_hidden_layers,
            "batch": batch, "seq": seq, "step_s": t, "tokens_per_s": batch * seq / t,
            "peak_bytes": peak, "trainable_params": trainable}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--model", help=".gguf file or transformers model directory "
                                        "(default: SmolLM2-135M architecture, random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, help="keep the first N decoder layers")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vocab", type=int, help="vocabulary of the random-weights model "
                                                  "(default SmolLM2's 49152; smaller for smoke runs)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq < 2 or args.reps < 1:
        parser.error("--batch and --reps must be >= 1 and --seq >= 2")
    device = torch.device(args.device)
    try:
        row = measure(args.variant, args.model, args.layers, device, args.batch, args.seq,
                      args.reps, args.vocab)
    except Skip as exc:
        row = {"variant": args.variant, "skipped": str(exc)}
        print(f"{args.variant}: skipped: {exc}")
    else:
        peak = "" if row["peak_bytes"] is None else f", peak {row['peak_bytes'] / 2**20:.0f} MiB"
        print(f"{args.variant}: {row['tokens_per_s']:.0f} tokens/s ({row['step_s'] * 1e3:.1f} ms "
              f"per step{peak}) {row['model']}")
    result = {"info": device_info(args.device), "row": row}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
