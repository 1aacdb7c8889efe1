"""``qlora-kernels train``: QLoRA fine-tuning of a local model on JSONL data, with
checkpoints, exact resume, evaluation, ``log.jsonl`` and ``loss.png``.

Example:
    $ qlora-kernels train --model model.gguf --data train.jsonl,eval.jsonl --out runs/x \\
          --max-steps 100 --save-every 20
    $ qlora-kernels train ... --out runs/x --resume     # after a crash: the same result
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings

import torch

from ..fileio import atomic_write
from .args import UsageError, check_train_args, identity
from .data import encode_dataset, epoch_order, pack, warn_if_fallback
from .loop import LoopConfig, make_optimizer, train


def _trim_log(path: str, step: int) -> None:
    """Keep the rows of steps <= ``step`` (a resumed run rewrites the later ones; a row
    torn by a kill is dropped)."""
    if not os.path.isfile(path):
        return
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                rows.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, lambda tmp: open(tmp, "w", encoding="utf-8").writelines(rows))


def read_log(path: str) -> list:
    """The rows of a run's ``log.jsonl``.

    Example:
        >>> read_log("/nonexistent/log.jsonl")
        []
    """
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _steps(a, n_units: int) -> int:
    if a.max_steps is not None:
        return a.max_steps
    per_step = a.batch_size * a.grad_accum
    return max(1, math.ceil((a.epochs if a.epochs is not None else 1.0) * n_units / per_step))


def run_train(args: argparse.Namespace, log=print, stream=None) -> dict:
    """Run ``train`` with parsed ``args`` (see ``args.add_train_arguments``); returns the
    loop's result dict plus ``out``, ``adapter_dir``, ``data`` (formats and counts).

    Example (needs a model):
        >>> run_train(parser.parse_args([...]))    # doctest: +SKIP
    """
    import qlora_kernels as qk

    from ..demo.report import plot_losses
    from .base import load_base
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    a = check_train_args(args)
    log(f"data: {a.train_path}: {len(a.records)} {a.train_format} records"
        + (f"; eval {a.eval_path}: {len(a.eval_records)} {a.eval_format} records" if a.eval_path else ""))
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    t0 = time.perf_counter()
    model, tok = load_base(a.model, a.compute_dtype, a.device, a.layers)
    if "chat" in (a.train_format, a.eval_format):
        warn_if_fallback(tok)
    train_ex, stats = encode_dataset(tok, a.train_format, a.records, a.max_seq_len, a.train_on_prompt)
    eval_ex, eval_stats = (encode_dataset(tok, a.eval_format, a.eval_records, a.max_seq_len,
                                          a.train_on_prompt) if a.eval_path else ([], None))
    for name, s in (("train", stats), ("eval", eval_stats)):
        if s is not None:
            log(f"{name}: {s['examples']} examples, {s['tokens']} tokens ({s['target_tokens']} "
                f"in the loss); {s['truncated']} truncated to {a.max_seq_len} tokens, "
                f"{s['dropped']} dropped (no target token left)")
    if not train_ex:
        raise UsageError(f"{a.train_path}: no example keeps a target token within "
                         f"--max-seq-len {a.max_seq_len}")
    units = pack(train_ex, a.max_seq_len) if a.packing else train_ex
    if a.packing:
        log(f"packing: {len(train_ex)} examples into {len(units)} sequences of <= {a.max_seq_len} tokens")
    steps = _steps(a, len(units))
    qk.prepare_model(model, target_modules=a.target_modules, r=a.r, lora_alpha=a.lora_alpha,
                     lora_dropout=a.lora_dropout, use_rslora=a.rslora,
                     compute_dtype=getattr(torch, a.compute_dtype), verbose=False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {a.model} ({len(model.model.layers)} decoder layers, loaded in "
        f"{time.perf_counter() - t0:.1f} s); LoRA r={a.r} alpha={a.lora_alpha:g} on "
        f"{a.target_modules if isinstance(a.target_modules, str) else ','.join(a.target_modules)}"
        f" ({n_train / 1e6:.2f}M trainable), compute {a.compute_dtype}, {steps} steps of "
        f"{a.batch_size} x {a.grad_accum}")
    cfg = LoopConfig(steps=steps, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum,
                     warmup=a.warmup_steps, schedule=a.schedule, min_lr_ratio=a.min_lr_ratio,
                     max_grad_norm=a.max_grad_norm, save_every=a.save_every,
                     eval_every=a.eval_every, seed=a.seed, max_bad_steps=a.max_bad_steps)
    optimizer, notes = make_optimizer(model, a.lr)
    for note in notes:
        log(f"note: {note}")
    os.makedirs(a.out, exist_ok=True)
    log_path = os.path.join(a.out, "log.jsonl")
    start, bad_in_row = 0, 0
    if a.resume:
        ckpt = latest_checkpoint(a.out)
        state = load_checkpoint(ckpt, model, optimizer)
        start, bad_in_row = state["step"], state["bad_in_row"]
        if state["data"]["units"] != len(units):
            raise UsageError(f"--resume: {ckpt} saw {state['data']['units']} training units, "
                             f"the data now gives {len(units)}")
        log(f"resuming from {ckpt} (step {start} of {steps})")
        _trim_log(log_path, start)
    elif os.path.exists(log_path):
        os.unlink(log_path)
    saved = identity(a)
    per_step = a.batch_size * a.grad_accum

    def on_save(step, opt, loop_state):
        position = step * per_step
        epoch = position // len(units)
        state = {"bad_in_row": loop_state["bad_in_row"],
                 "scheduler": {"schedule": a.schedule, "lr": a.lr, "warmup": a.warmup_steps,
                               "min_lr_ratio": a.min_lr_ratio, "steps": steps,
                               "last_lr": opt.param_groups[0]["lr"]},
                 "data": {"seed": a.seed, "units": len(units), "epoch": epoch,
                          "position_in_epoch": position % len(units),
                          "order": epoch_order(len(units), a.seed, epoch)}}
        save_checkpoint(a.out, step, model, opt, state, saved, keep=a.keep,
                        base_model_name_or_path=a.model)

    with open(log_path, "a", encoding="utf-8") as log_file:
        def on_log(row):
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        res = train(model, units, tok.pad_token_id, cfg, optimizer=optimizer, start_step=start,
                    bad_in_row=bad_in_row, eval_units=eval_ex, on_save=on_save, on_log=on_log,
                    stream=stream)
    res["optimizer_notes"] = notes
    adapter_dir = os.path.join(a.out, "adapter")
    if not res["interrupted"] and not res["stopped"]:
        qk.save_adapter(model, adapter_dir, a.model)
    rows = read_log(log_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    plotted = plot_losses(losses, os.path.join(a.out, "loss.png"), evals=evals,
                          title=f"QLoRA fine-tune of {os.path.basename(a.model)}")
    log(f"{res['steps_done'] - start} steps in {res['seconds']:.1f} s, {res['tokens_per_s']:.0f} "
        f"tokens/s, peak memory {res['peak_memory_bytes'] / 2**30:.2f} GiB"
        + (f", {res['bad_steps']} skipped (non-finite)" if res["bad_steps"] else ""))
    if evals:
        log(f"eval loss {evals[-1][1]:.4f} (perplexity {math.exp(min(evals[-1][1], 700)):.3f}) "
            f"at step {evals[-1][0]}")
    log(f"adapter: {adapter_dir if os.path.isdir(adapter_dir) else '(not written)'}; log: "
        f"{log_path}" + (f"; loss plot: {os.path.join(a.out, 'loss.png')}" if plotted else ""))
    return dict(res, out=a.out, adapter_dir=adapter_dir, steps=steps,
                data={"train_format": a.train_format, "eval_format": a.eval_format,
                      "train": stats, "eval": eval_stats})


def main(args: argparse.Namespace) -> int:
    """Entry point of ``qlora-kernels train``: exit 2 with one line for a usage error, 1
    when stopped by non-finite steps, 130 on Ctrl-C.

    Example:
        $ python -m qlora_kernels train --model m.gguf --data d.jsonl --out runs/x
    """
    from ..demo.model import DemoDependencyError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            res = run_train(args)
    except (UsageError, DemoDependencyError, ValueError, FileNotFoundError) as exc:
        # ValueError: also what loading raises for a bad checkpoint (CheckpointError)
        print(f"qlora-kernels train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the checkpoints under --out are intact", file=sys.stderr)
        return 130
    if res["stopped"]:
        print(f"qlora-kernels train: {res['stopped']}; checkpoint saved in {res['out']}",
              file=sys.stderr)
        return 1
    return 130 if res["interrupted"] else 0
