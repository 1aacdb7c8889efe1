"""``qlora-kernels merge``: fold a LoRA adapter into its base model and write a dense
transformers model (``from_pretrained(out)`` loads it) with the tokenizer, or with
``--quantized`` the merged model re-quantized to NF4 in the bitsandbytes layout, with the
extra error that re-quantization adds.

Example:
    $ qlora-kernels merge --model model.gguf --adapter runs/x/adapter --out merged
"""
from __future__ import annotations

import argparse
import os

import torch

from ..fileio import set_usual_file_mode
from .args import UsageError, check_model, check_out_dir, run_command

DTYPES = ("bfloat16", "float16", "float32")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``qlora-kernels merge``.

    Example:
        >>> p = argparse.ArgumentParser(); add_merge_arguments(p)
        >>> p.parse_args(["--model", "m", "--adapter", "a", "--out", "o"]).dtype
        'bfloat16'
    """
    p.add_argument("--model", required=True, help="the base: a .gguf file or a transformers directory")
    p.add_argument("--adapter", required=True, help="a PEFT-layout adapter directory")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the dense model")
    p.add_argument("--quantized", action="store_true",
                   help="write the merged model re-quantized (NF4 + DQ, bitsandbytes layout)")


def check_adapter_dir(path: str) -> dict:
    """An adapter directory's config (``qk.read_adapter_config``), or ``UsageError``.

    Example:
        >>> check_adapter_dir("/nonexistent")
        Traceback (most recent call last):
        qlora_kernels.train.args.UsageError: --adapter /nonexistent: not a directory
    """
    from ..adapters import read_adapter_config

    if not os.path.isdir(path):
        raise UsageError(f"--adapter {path}: not a directory")
    try:
        return read_adapter_config(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--adapter {path}: {exc}") from None


def adapted_model(model_path: str, adapter: str, compute_dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)``: the 4-bit base with the adapter loaded (its config gives
    the target modules and LoRA settings).

    Example (needs a model and an adapter):
        model, tok = adapted_model("model.gguf", "runs/x/adapter")
    """
    import qlora_kernels as qk

    from .base import load_base

    model, tok = load_base(model_path, compute_dtype, device)
    qk.load_adapter(model, adapter, compute_dtype=getattr(torch, compute_dtype), verbose=False)
    return model.eval(), tok  # the new adapter layers start in training mode (dropout)


def requantize(model, compute_dtype: torch.dtype) -> float:
    """Replace every dense linear layer but the output head by ``Linear4bit`` (NF4 + double
    quantization, blocksize 64), in place; return the largest relative Frobenius error
    ``||dequant(W4) - W|| / ||W||`` over them (what ``--quantized`` adds to the merge).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64)); 0 < requantize(m, torch.float32) < 0.2
        True
    """
    from ..functional import dequantize_4bit
    from ..nn import Linear4bit
    from ..prepare import output_head_names, set_module

    heads = output_head_names(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in heads]
    worst = 0.0
    for name in names:
        dense = model.get_submodule(name)
        q = Linear4bit.from_linear(dense, quant_type="nf4", blocksize=64, double_quant=True,
                                   compute_dtype=compute_dtype)
        w = dense.weight.detach().float()
        err = (dequantize_4bit(q.weight, q.quant_state).float() - w).norm() / w.norm().clamp_min(1e-30)
        worst = max(worst, float(err))
        set_module(model, name, q)
    return worst


def run_merge(args: argparse.Namespace, log=print) -> dict:
    """Merge as ``args`` say; returns ``{"out", "layers", "requantization_error"}``.

    Example (needs a model and an adapter):
        >>> run_merge(parser.parse_args([...]))   # doctest: +SKIP
    """
    import qlora_kernels as qk
    from ..prepare import lora_layers

    check_model(args.model)
    check_adapter_dir(args.adapter)
    check_out_dir(args.out)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"--out {args.out}: not empty (the merged model needs its own directory)")
    model, tok = adapted_model(args.model, args.adapter)
    n = len(lora_layers(model))
    dtype = getattr(torch, args.dtype)
    qk.merge_lora(model, dtype=torch.float32)  # dense W + scale * B @ A, in float32
    result = {"out": args.out, "layers": n, "requantization_error": None}
    if args.quantized:
        result["requantization_error"] = requantize(model, dtype)
        model.to(dtype)
        qk.save_pretrained(model, args.out, tokenizer=tok)
        log(f"merged {n} adapted layers; re-quantized to NF4 + DQ: largest relative weight "
            f"error {result['requantization_error']:.4f}; written to {args.out}")
    else:
        model.to(dtype)
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        for entry in os.scandir(args.out):  # transformers writes safetensors' 0600 files
            if entry.is_file(follow_symlinks=False):
                set_usual_file_mode(entry.path)
        log(f"merged {n} adapted layers into a dense {args.dtype} model: {args.out}")
    return result


def main(args: argparse.Namespace) -> int:
    """Entry point of ``qlora-kernels merge`` (exit 2 with one line on bad input).

    Example:
        $ python -m qlora_kernels merge --model m.gguf --adapter runs/x/adapter --out merged
    """
    return run_command("merge", run_merge, args)
