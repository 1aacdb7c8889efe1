"""Perplexity of a causal LM on held-out text, and the table over 4-bit formats (the
QLoRA paper's comparison: NF4 vs FP4 vs INT4, with and without double quantization).

Example (needs a causal LM):
    ppl = perplexity(model, ids, seq_len=512)     # exp(mean next-token loss)
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, Optional

import torch

from .model import decoder_linear_names, quantize_linears, quantized_bytes, restore_linears

# (label, quant_type, double_quant) in the order printed.
VARIANTS = (("NF4 + DQ", "nf4", True), ("NF4", "nf4", False), ("FP4", "fp4", False),
            ("INT4", "int4", False))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``seq_len``
    tokens of the 1-D ``ids`` (the last partial window is dropped unless it is the only one).

    Example (needs a causal LM):
        perplexity(model, torch.tensor(token_ids), seq_len=256)
    """
    device = next(model.parameters()).device
    n = ids.numel()
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    seq_len = min(seq_len, n)
    windows = ids[: (n // seq_len) * seq_len].view(-1, seq_len)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def perplexity_table(model, ids: torch.Tensor, seq_len: int = 512, blocksize: int = 64,
                     compute_dtype=None, log: Optional[Callable[[str], None]] = print,
                     variants=VARIANTS) -> List[dict]:
    """Perplexity of the unquantized model, then of the model with every decoder linear
    layer quantized to each format in ``variants`` (the layers are swapped for
    ``Linear4bit`` and restored afterwards, so ``model`` is unchanged on return). Each row:
    ``format``, ``ppl``, ``weight_bytes`` (measured), ``bits_per_param``, ``seconds``.

    Example (needs a causal LM):
        rows = perplexity_table(model, ids)     # rows[0]["format"] == "unquantized"
    """
    names = decoder_linear_names(model)
    n_params = sum(model.get_submodule(n).weight.numel() for n in names)
    dense_bytes = sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size()
                      for n in names)
    rows = []
    t0 = time.perf_counter()
    ppl = perplexity(model, ids, seq_len)
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    rows.append({"format": f"unquantized ({dtype_name})", "quant_type": None, "double_quant": False,
                 "ppl": ppl, "weight_bytes": dense_bytes,
                 "bits_per_param": 8.0 * dense_bytes / n_params,
                 "seconds": time.perf_counter() - t0})
    if log:
        log(_row_line(rows[-1]))
    for label, qt, dq in variants:
        t0 = time.perf_counter()
        originals = quantize_linears(model, names, qt, dq, blocksize, compute_dtype)
        try:
            nbytes = quantized_bytes(model, names)
            ppl = perplexity(model, ids, seq_len)
        finally:
            restore_linears(model, originals)
        rows.append({"format": label, "quant_type": qt, "double_quant": dq, "ppl": ppl,
                     "weight_bytes": nbytes, "bits_per_param": 8.0 * nbytes / n_params,
                     "seconds": time.perf_counter() - t0})
        if log:
            log(_row_line(rows[-1]))
    return rows


def _row_line(r: dict) -> str:
    return (f"  {r['format']:<20} {r['ppl']:>10.3f} {r['bits_per_param']:>10.3f} "
            f"{r['weight_bytes'] / 2**20:>9.1f} {r['seconds']:>7.1f}")


def table_header() -> str:
    """Header matching the rows that ``perplexity_table`` logs.

    Example:
        >>> table_header().split()[:2]
        ['format', 'perplexity']
    """
    return f"  {'format':<20} {'perplexity':>10} {'bits/param':>10} {'MiB':>9} {'s':>7}"
