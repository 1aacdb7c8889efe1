"""Every compiled CUDA kernel once, on small inputs that reach each code path, for
compute-sanitizer (memcheck, racecheck) in scripts/gpu_check.py: 4-bit quantize and
dequantize (NF4/FP4/INT4, odd sizes, nested absmax, a misaligned output), 8-bit, both GEMV
kernels (fast with x in one pass and in several passes over K, general, many row tiles),
AdamW 32-bit, multi-tensor and 8-bit. Results are checked against the CPU reference
loosely (the GPU tests check them exactly); the point is the sanitizer's report.

Usage: compute-sanitizer --tool memcheck python scripts/gpu_kernel_smoke.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qlora_kernels as qk  # noqa: E402
from qlora_kernels.backends import reference as ref  # noqa: E402

OPS = torch.ops.qlora_kernels


def main() -> None:
    if not (torch.cuda.is_available() and qk._extension.cuda_kernels_built()):
        sys.exit("needs a GPU and qlora_kernels built with its CUDA kernels")
    g = torch.Generator().manual_seed(0)
    dev = "cuda"
    for quant_type in ("nf4", "fp4", "int4"):
        for n, bs in ((1, 64), (333 * 77, 64), (4096 + 17, 4096), (100, 32)):
            x = torch.randn(n, generator=g)
            p, a = OPS.quantize_4bit(x.to(dev, torch.bfloat16), bs, quant_type)
            code = qk.get_4bit_code(quant_type).to(dev)
            y = OPS.dequantize_4bit(p, a, code, bs, n, torch.float16)
            out = torch.empty(n + 1, dtype=torch.float32, device=dev)[1:]  # misaligned
            OPS.dequantize_4bit_out(p, a, code, bs, None, None, 0.0, out)
            assert torch.equal(out.half(), y)
    # nested absmax
    W = torch.randn(96, 200, generator=g)
    packed, st = qk.quantize_4bit(W.to(dev), 64, "nf4", double_quant=True)
    y = qk.dequantize_4bit(packed, st)
    assert (y.cpu() - W).abs().max() < 1.0
    # 8-bit
    code8 = qk.dynamic_map(signed=True).to(dev)
    x = torch.randn(5000, generator=g).to(dev)
    q, a = OPS.quantize_8bit(x, code8, 256)
    OPS.dequantize_8bit(q, a, code8, 256, torch.bfloat16)
    # GEMV: fast (one pass, several passes over K), general (K % blocksize != 0), many tiles
    for M, K, N, bs in ((1, 256, 40, 64), (16, 28672, 24, 64), (5, 100, 17, 64),
                        (3, 64 * 1000, 9, 64), (70000, 64, 3, 64)):
        Wq = torch.randn(N, K, generator=g)
        pk, a = ref.quantize_4bit(Wq, bs, "nf4")
        code = qk.get_4bit_code("nf4")
        x = torch.randn(M, K, generator=g)
        y = OPS.gemv_4bit(x.to(dev, torch.bfloat16), pk.to(dev), a.to(dev), code.to(dev), bs, N)
        want = x @ ref.dequantize_4bit(pk, a, code, bs, N * K, torch.float32).view(N, K).t()
        err = (y.float().cpu() - want).abs().max().item()
        assert err <= 0.05 * want.abs().max().item() + 1e-3, (M, K, N, err)
    # AdamW: 32-bit, multi-tensor, 8-bit
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(dev)) for n in (1, 1000, 70000)]
    for cls in (qk.optim.AdamW, qk.optim.AdamW8bit):
        opt = cls(params, lr=1e-3)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    p = torch.randn(3000, device=dev, dtype=torch.bfloat16)
    m, v = torch.zeros(3000, device=dev), torch.zeros(3000, device=dev)
    OPS.adamw_step_(p, torch.randn_like(p), m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, False)
    torch.cuda.synchronize()
    print("kernel smoke: ok")


if __name__ == "__main__":
    main()
