"""The QLoRA fine-tune of the demo: compute-dtype choice (measured), the training loop
(paged AdamW, gradient checkpointing, a progress bar with loss, tokens/s and peak memory,
atomic adapter checkpoints), held-out loss and greedy generation.

Example (needs a model prepared with ``qk.prepare_model``):
    result = train(model, tok, encoded_train, steps=60, out_dir="runs/demo")
"""
from __future__ import annotations

import math
import os
import resource
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .data import batches, collate


# ----------------------------------------------------------------------------- dtype
def _time_matmul(dtype: torch.dtype, device: torch.device, m: int = 256, k: int = 576,
                 n: int = 1536, reps: int = 5) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    (a @ b)  # warm-up (allocator, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def choose_compute_dtype(device: torch.device, requested: str = "auto") -> Tuple[torch.dtype, Dict]:
    """The compute dtype for the 4-bit layers: ``requested`` ("float32"/"bfloat16"), or with
    "auto" the faster of the two on a matmul of the model's MLP shape, measured now
    (CPUs without native bf16 run float32 several times faster). Returns (dtype, timings).

    Example:
        >>> dt, t = choose_compute_dtype(torch.device("cpu"), "float32"); dt
        torch.float32
    """
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested], {}
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32, {}
    timings = {str(dt).replace("torch.", ""): _time_matmul(dt, device)
               for dt in (torch.float32, torch.bfloat16)}
    best = min(timings, key=timings.get)
    return getattr(torch, best), timings


# ----------------------------------------------------------------------------- memory
def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak RSS.

    Example:
        >>> peak_memory_bytes(torch.device("cpu")) > 0
        True
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def heldout_loss(model, encoded: list, pad_id: int, batch_size: int = 8) -> float:
    """Mean next-token loss over the reply tokens of the held-out examples.

    Example (needs a causal LM):
        heldout_loss(model, [encode_chat(tok, ex) for ex in test], tok.pad_token_id)
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        b = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       use_cache=False).logits.float()
        labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1), ignore_index=-100,
                                                 reduction="sum")
        total += loss.item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    """Greedy reply of the chat model to one user message.

    Example (needs a chat model):
        generate(model, tok, "What is the capital of France?")
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar (rewritten in place on a terminal, one line per
    ``every`` steps otherwise).

    Example:
        >>> import io; p = Progress(10, stream=io.StringIO()); p.update(5, loss=1.0, tok_s=100, peak=2**30)
        >>> "5/10" in p.stream.getvalue()
        True
    """

    def __init__(self, total: int, stream=None, width: int = 24, every: int = 0):
        self.total, self.width = total, width
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every or max(1, total // 10)

    def update(self, step: int, loss: float, tok_s: float, peak: int, extra: str = "") -> None:
        done = int(self.width * step / self.total)
        bar = "#" * done + "." * (self.width - done)
        line = (f"  step {step:>4}/{self.total} [{bar}] loss {loss:6.3f} | {tok_s:7.0f} tok/s"
                f" | peak {peak / 2**30:5.2f} GiB{extra}")
        if self.tty:
            self.stream.write("\r" + line)
            if step == self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step == self.total or step == 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- train
def _checkpointing(model, on: bool) -> None:
    # transformers >= 5 names it activation checkpointing (the old name warns). The
    # non-reentrant variant needs no input that requires grad (prepare_model's embedding
    # hook makes the reentrant one work too).
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        fn = getattr(model, f"{prefix}_checkpointing_enable", None)
        if fn is not None:
            fn(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        fn = getattr(model, f"{prefix}_checkpointing_disable", None)
        if fn is not None:
            fn()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 10% of ``lr``.

    Example:
        >>> lr_at(1, 100, 1.0, 10), round(lr_at(100, 100, 1.0, 10), 2)
        (0.1, 0.1)
    """
    if step <= warmup:
        return lr * step / max(warmup, 1)
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train(model, encoded: list, pad_id: int, steps: int, out_dir: str, lr: float = 1e-3,
          batch_size: int = 8, warmup: int = 5, save_every: int = 20, seed: int = 0,
          gradient_checkpointing: bool = True, max_grad_norm: float = 1.0,
          on_save: Optional[Callable[[str], None]] = None, stream=None,
          base_model_name_or_path: Optional[str] = None) -> dict:
    """Fine-tune the LoRA parameters of a ``prepare_model``-ed causal LM with
    ``qk.optim.PagedAdamW``. The adapter is saved (atomically, by ``qk.save_adapter``) to
    ``out_dir/adapter`` every ``save_every`` steps and at the end; Ctrl-C stops training
    between steps and leaves the last saved adapter intact. Returns a dict with
    ``losses`` (per step), ``tokens_per_s``, ``peak_memory_bytes``, ``seconds``,
    ``steps_done``, ``saved_step``, ``interrupted``, ``optimizer_notes``.

    Example (needs a prepared model):
        result = train(model, encoded, tok.pad_token_id, steps=60, out_dir="runs/demo")
    """
    import qlora_kernels as qk

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: run qk.prepare_model(model, ...) first")
    with warnings.catch_warnings(record=True) as caught:
        # On a CPU PagedAdamW warns that paging needs CUDA; reported once in the summary.
        warnings.simplefilter("always")
        opt = qk.optim.PagedAdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    notes = [str(w.message) for w in caught]
    if gradient_checkpointing:
        _checkpointing(model, True)
    if hasattr(model, "config"):
        model.config.use_cache = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    adapter_dir = os.path.join(out_dir, "adapter")
    model.train()
    progress = Progress(steps, stream=stream)
    losses: List[float] = []
    tokens, saved_step, interrupted = 0, 0, False
    t_start = time.perf_counter()
    try:
        for step, batch in enumerate(batches(encoded, batch_size, steps, seed), 1):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            b = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            out = model(**b, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            tokens += int(b["attention_mask"].sum())
            elapsed = time.perf_counter() - t_start
            if step % save_every == 0 or step == steps:
                qk.save_adapter(model, adapter_dir, base_model_name_or_path=base_model_name_or_path)
                saved_step = step
                if on_save:
                    on_save(adapter_dir)
            progress.update(step, losses[-1], tokens / elapsed, peak_memory_bytes(device))
    except KeyboardInterrupt:
        # Stop between (or inside) steps; the adapter on disk is the last complete save
        # (save_adapter writes a new directory and switches to it: one transaction).
        interrupted = True
        progress.close()
    elapsed = time.perf_counter() - t_start
    if gradient_checkpointing:
        _checkpointing(model, False)
    if hasattr(model, "config"):
        model.config.use_cache = True
    model.eval()
    return {"losses": losses, "steps_done": len(losses), "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "peak_memory_bytes": peak_memory_bytes(device), "saved_step": saved_step,
            "adapter_dir": adapter_dir, "interrupted": interrupted, "optimizer_notes": notes}
