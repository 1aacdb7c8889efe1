"""PNG plots of a results file written by ``python -m benchmarks`` (matplotlib, Agg).

Example:
    >>> plot_all({"sections": {}}, "/tmp", "none")
    []
"""
from __future__ import annotations

import os


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_all(results: dict, out_dir: str, name: str) -> list:
    """Write one PNG per plotted section; returns their paths (none without matplotlib)."""
    plt = _plt()
    if plt is None:
        print("matplotlib not installed: no plots")
        return []
    sec = results.get("sections", {})
    ceil = sec.get("ceilings", {})
    paths = []

    def save(fig, section):
        path = os.path.join(out_dir, f"{name}-{section}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    rows = [r for r in sec.get("quantize", {}).get("rows", []) if "GB/s" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['backend']}\n{r['op']}\n{'x'.join(map(str, r['shape']))}" for r in rows]
        ax.bar(range(len(rows)), [r["GB/s"] for r in rows], color="tab:blue")
        if "copy_GBps" in ceil:
            ax.axhline(ceil["copy_GBps"], color="red", ls="--", label="memory copy ceiling")
            ax.legend()
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        ax.set_ylabel("GB/s (bytes moved / time)")
        ax.set_title("quantize / dequantize throughput")
        save(fig, "quantize")

    rows = sec.get("matmul", {}).get("rows", [])
    if rows:
        shapes = sorted({tuple(r["shape"]) for r in rows})
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            rs = sorted((r for r in rows if tuple(r["shape"]) == shape), key=lambda r: r["rows"])
            m = [r["rows"] for r in rs]
            for key, label in (("gemv_ms", "4-bit GEMV"), ("gemm_ms", "4-bit GEMM"),
                               ("dense_bf16_ms", "dense bf16"), ("dense_f32_ms", "dense f32"),
                               ("bnb_ms", "bitsandbytes matmul_4bit")):  # bnb: when installed
                pts = [(mm, r[key]) for mm, r in zip(m, rs) if key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rows of x")
            ax.set_ylabel("ms")
            ax.set_title(f"W {shape[0]}x{shape[1]}")
            ax.legend(fontsize=7)
        save(fig, "matmul")

    train = sec.get("train_step", {}).get("rows", [])
    if train:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
        kinds = [r["kind"] for r in train]
        a1.bar(kinds, [r["tokens_per_s"] for r in train])
        a1.set_ylabel("tokens/s")
        a2.bar(kinds, [r["peak_bytes"] / 2**20 for r in train], color="tab:orange")
        a2.set_ylabel("peak MiB")
        fig.suptitle("one training step")
        save(fig, "train_step")
    return paths
