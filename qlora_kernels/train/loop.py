"""The one training loop (``qlora-kernels train`` and the demo): compute-dtype choice
(measured), paged AdamW, gradient accumulation, warm-up + cosine or constant schedule,
gradient-norm clipping, non-finite steps skipped and counted, evaluation, a progress bar
with loss, tokens/s, peak memory and ETA; plus held-out loss and greedy generation.

The data stream and the RNG are functions of the seed and the step (``data.microbatch``),
so a run resumed from a checkpoint (``checkpoint.py``) follows the same code path as an
uninterrupted one and gives the same losses and adapter bytes.

Example (needs a model prepared with ``qk.prepare_model``):
    result = train(model, units, tok.pad_token_id, LoopConfig(steps=60))
"""
from __future__ import annotations

import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .data import collate, microbatch, render_chat


# ----------------------------------------------------------------------------- dtype
def choose_compute_dtype(device: torch.device, requested: str = "auto") -> Tuple[torch.dtype, str]:
    """The compute dtype for the 4-bit layers and why: ``requested`` ("float32"/"bfloat16"),
    or with "auto" what ``qlora_kernels.compute_dtype.resolve_compute_dtype`` picks for
    ``device`` (the one meaning of "auto", shared with ``prepare_model`` and ``train``).

    Example:
        >>> choose_compute_dtype(torch.device("cpu"), "float32")
        (torch.float32, 'requested')
    """
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested], "requested"
    from ..compute_dtype import resolve_compute_dtype
    dtype = resolve_compute_dtype("auto", device)
    if device.type == "cuda":
        return dtype, "auto: bf16 on CUDA"
    native = "computes" if dtype == torch.bfloat16 else "does not compute"
    return dtype, f"auto: this CPU {native} bf16 natively"


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
    """Mean next-token loss over the target tokens (labels != -100) of ``encoded``
    (``(ids, labels)`` examples), from the full logits (no dropout, no RNG use).

    Example (needs a causal LM):
        heldout_loss(model, examples, tok.pad_token_id)
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
def generate(model, tokenizer, question: str, max_new_tokens: int = 40,
             temperature: float = 0.0, streamer=None) -> str:
    """The chat model's reply to one user message (chat template, or the fallback
    template when the tokenizer has none): greedy at ``temperature`` 0, else sampled
    (seed torch first for a repeatable sample). ``streamer``: a transformers streamer.

    Example (needs a chat model):
        generate(model, tok, "What is the capital of France?")
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text = render_chat(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sample)
    model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar (rewritten in place on a terminal, one line per
    ``every`` steps otherwise): step, loss, tokens/s, peak memory, ETA.

    Example:
        >>> import io; p = Progress(10, stream=io.StringIO()); p.update(5, loss=1.0, tok_s=100, peak=2**30)
        >>> "5/10" in p.stream.getvalue()
        True
    """

    def __init__(self, total: int, stream=None, width: int = 24, every: int = 0, first: int = 0):
        self.total, self.width, self.first = total, width, first
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every or max(1, total // 10)
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tok_s: float, peak: int, extra: str = "") -> None:
        done = int(self.width * step / self.total)
        bar = "#" * done + "." * (self.width - done)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        line = (f"  step {step:>4}/{self.total} [{bar}] loss {loss:6.3f} | {tok_s:7.0f} tok/s"
                f" | peak {peak / 2**30:5.2f} GiB | ETA {eta:4.0f} s{extra}")
        if self.tty:
            self.stream.write("\r" + line)
            if step == self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step == self.total or step == self.first + 1:
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
    # hook makes the reentrant one work too). It restores the RNG state for the recompute,
    # so dropout masks are the same in both passes.
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        fn = getattr(model, f"{prefix}_checkpointing_enable", None)
        if fn is not None:
            fn(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        fn = getattr(model, f"{prefix}_checkpointing_disable", None)
        if fn is not None:
            fn()


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str = "cosine",
          min_ratio: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_ratio * lr`` over the
    remaining steps, or (``schedule="constant"``) ``lr`` after the warm-up.

    Example:
        >>> lr_at(1, 100, 1.0, 10), round(lr_at(100, 100, 1.0, 10), 2), lr_at(50, 100, 1.0, 10, "constant")
        (0.1, 0.1, 1.0)
    """
    if step <= warmup:
        return lr * step / max(warmup, 1)
    if schedule == "constant":
        return lr
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (min_ratio + (1 - min_ratio) / 2 * (1 + math.cos(math.pi * t)))


@dataclass
class LoopConfig:
    """The training loop's settings (``qlora-kernels train`` maps its options onto these).

    Example:
        >>> LoopConfig(steps=10).max_grad_norm
        0.3
    """
    steps: int
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup: int = 5
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 0.3   # QLoRA's
    save_every: int = 10
    eval_every: int = 0          # 0: evaluate at the end only (when there is eval data)
    seed: int = 0
    max_bad_steps: int = 10
    gradient_checkpointing: bool = True


def make_optimizer(model, lr: float):
    """``qk.optim.PagedAdamW`` over the trainable parameters; returns ``(optimizer,
    notes)``, notes being the warnings it raised (on a CPU: paging needs CUDA).

    Example (needs a prepared model):
        opt, notes = make_optimizer(model, 2e-4)
    """
    import qlora_kernels as qk

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: run qk.prepare_model(model, ...) first")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = qk.optim.PagedAdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return opt, [str(w.message) for w in caught]


def _grad_norm(params, max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def train(model, units: list, pad_id: int, cfg: LoopConfig, *, optimizer=None,
          start_step: int = 0, bad_in_row: int = 0, eval_units: Optional[list] = None,
          on_save: Optional[Callable[[int, object, dict], None]] = None,
          on_log: Optional[Callable[[dict], None]] = None, stream=None) -> dict:
    """Fine-tune the LoRA parameters of a ``prepare_model``-ed causal LM on ``units``
    (``(ids, labels)`` examples or packed ``(ids, labels, position_ids)`` sequences) from
    step ``start_step + 1`` to ``cfg.steps``. Step ``s`` uses micro-batches
    ``(s-1)*grad_accum ...`` of the seeded stream (``data.microbatch``). A step whose loss
    or gradient norm is not finite changes nothing and is counted; ``cfg.max_bad_steps`` of
    them in a row stop the run (``stopped`` holds why; ``bad_in_row`` carries the count
    over a resume). ``on_save(step, optimizer, {"bad_in_row": n})`` runs every
    ``cfg.save_every`` steps, at the end, and when stopping; ``on_log(row)`` gets one
    dict per step (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``,
    ``peak_mem``, ``skipped``) and per evaluation (``step``, ``eval_loss``, ``eval_ppl``:
    before training when starting at step 0, every ``cfg.eval_every`` steps, at the end).
    Time spent evaluating and saving is left out of tokens/s and ``seconds``.
    Ctrl-C stops between steps (``interrupted``). Returns a dict with ``losses`` (this
    run's steps), ``evals``, ``tokens_per_s``, ``peak_memory_bytes``, ``seconds``,
    ``steps_done``, ``bad_steps``, ``interrupted``, ``stopped``, ``optimizer_notes``.

    Example (needs a prepared model):
        result = train(model, units, tok.pad_token_id, LoopConfig(steps=60))
    """
    device = next(model.parameters()).device
    notes: List[str] = []
    if optimizer is None:
        optimizer, notes = make_optimizer(model, cfg.lr)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.gradient_checkpointing:
        _checkpointing(model, True)
    if hasattr(model, "config"):
        model.config.use_cache = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    progress = Progress(cfg.steps, stream=stream, first=start_step)
    losses: List[float] = []
    evals: List[dict] = []
    tokens, bad_total = 0, 0
    interrupted, stopped, step = False, None, start_step
    log = on_log or (lambda row: None)
    paused = [0.0]  # seconds in evaluation and saving: not counted in tokens/s

    def evaluate(step):
        if eval_units:
            t0 = time.perf_counter()
            loss = heldout_loss(model, eval_units, pad_id)
            row = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}
            evals.append(row)
            log(row)
            paused[0] += time.perf_counter() - t0

    def save(step):
        t0 = time.perf_counter()
        on_save(step, optimizer, {"bad_in_row": bad_in_row})
        paused[0] += time.perf_counter() - t0

    if start_step == 0:
        evaluate(0)  # the loss before training, for the log and the plot
    paused[0] = 0.0
    t_start = time.perf_counter()

    try:
        for step in range(start_step + 1, cfg.steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
            loss_sum = None
            for j in range(cfg.grad_accum):
                batch = microbatch(units, cfg.batch_size, cfg.seed, (step - 1) * cfg.grad_accum + j)
                b = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
                out = model(**b, use_cache=False)
                loss = out.loss if cfg.grad_accum == 1 else out.loss / cfg.grad_accum
                loss.backward()
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                tokens += sum(len(u[0]) for u in batch)
            loss_value = loss_sum.item()
            grad_norm = _grad_norm(params, cfg.max_grad_norm)
            skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
            if skipped:
                bad_in_row += 1
                bad_total += 1
            else:
                bad_in_row = 0
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            elapsed = time.perf_counter() - t_start - paused[0]
            peak = peak_memory_bytes(device)
            log({"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                 "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                 "peak_mem": peak, "skipped": skipped})
            if bad_in_row >= cfg.max_bad_steps:
                stopped = (f"{bad_in_row} steps in a row (up to step {step}) had a non-finite "
                           f"loss or gradient; stopped (try a lower --lr)")
                if on_save:
                    save(step)
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                evaluate(step)
            if on_save and (step % cfg.save_every == 0 or step == cfg.steps):
                save(step)
            progress.update(step, loss_value, tokens / elapsed, peak,
                            f" | skipped {bad_total}" if bad_total else "")
        else:
            evaluate(cfg.steps)
    except KeyboardInterrupt:
        # Stop between (or inside) steps; what is on disk is the last complete save.
        interrupted = True
        progress.close()
    elapsed = time.perf_counter() - t_start - paused[0]
    if cfg.gradient_checkpointing:
        _checkpointing(model, False)
    if hasattr(model, "config"):
        model.config.use_cache = True
    model.eval()
    return {"losses": losses, "evals": evals, "steps_done": len(losses) + start_step,
            "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "peak_memory_bytes": peak_memory_bytes(device), "bad_steps": bad_total,
            "interrupted": interrupted, "stopped": stopped, "optimizer_notes": notes}
