"""The demo's outputs: printed tables, the JSON run report and the loss-curve PNG, each
written to a temporary file and renamed, so an interrupted run never leaves a torn file.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); write_json({"a": 1}, os.path.join(d, "r.json"))
    >>> open(os.path.join(d, "r.json")).read().strip()
    '{\\n  "a": 1\\n}'
"""
from __future__ import annotations

import json
from typing import List, Optional

from ..fileio import atomic_write


def write_json(obj, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Example:
        write_json(report, "runs/demo/report.json")
    """
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, w)


def memory_table(rows: List[dict]) -> str:
    """The weight-memory table (format, MiB, bits per parameter, ratio to float32).

    Example:
        >>> print(memory_table([{"format": "float32", "bytes": 32, "bits_per_param": 32.0}]))
        ... # doctest: +NORMALIZE_WHITESPACE
        | format | MiB | bits/param | vs float32 |
        |---|---:|---:|---:|
        | float32 | 0.0 | 32.000 | 1.00x |
    """
    base = rows[0]["bytes"]
    lines = ["| format | MiB | bits/param | vs float32 |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bytes'] / 2**20:.1f} | {r['bits_per_param']:.3f} | "
                     f"{base / r['bytes']:.2f}x |")
    return "\n".join(lines)


def perplexity_markdown(rows: List[dict]) -> str:
    """The perplexity table as Markdown (for the README).

    Example:
        >>> print(perplexity_markdown([{"format": "NF4", "ppl": 10.0, "bits_per_param": 4.5}]))
        | format | perplexity | bits/param |
        |---|---:|---:|
        | NF4 | 10.000 | 4.500 |
    """
    lines = ["| format | perplexity | bits/param |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['ppl']:.3f} | {r['bits_per_param']:.3f} |")
    return "\n".join(lines)


def plot_losses(losses: List[float], path: str, heldout: Optional[tuple] = None,
                title: str = "QLoRA fine-tune", evals: Optional[List[tuple]] = None) -> bool:
    """Save the per-step training loss (and the held-out loss before/after as two points,
    or ``evals``, ``(step, loss)`` points of periodic evaluation) to a PNG. Returns False
    (and writes nothing) when matplotlib is not installed.

    Example:
        plot_losses([2.0, 1.5, 1.2], "runs/demo/loss.png", heldout=(2.1, 1.3))
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, label="training loss (per step)", lw=1.2)
    if heldout is not None and len(losses):
        ax.plot([0, len(losses)], list(heldout), "o--", label="held-out loss", ms=5)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o--", label="eval loss", ms=5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return True
