"""The Triton GEMM's autotune candidates fit the target GPUs, checked without a GPU.

Each config of ``gpu_tile_configs(dtype)`` (qlora_kernels/triton/matmul_4bit.py) is
compiled ahead of time for sm_89 (RTX 4090) with bf16 x, and for sm_80, sm_86 and sm_89
with float32 x, with double-quantized scales and a bias. A config needing more shared
memory than a block may have would be dropped by the autotuner at run time (out of resources) on every target GPU; one that spills
registers would be slow. The compile runs in a subprocess because the tests run Triton in
interpreter mode (tests/conftest.py), where kernels cannot be compiled. Spills are read with
cuobjdump (Triton's wheel ships one); skips where Triton cannot compile for CUDA here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import find_cuobjdump

MAX_SHARED_SM89 = 99 * 1024  # bytes per block (opt-in maximum on sm_86 and sm_89)

SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import torch
from qlora_kernels.triton.matmul_4bit import _matmul_4bit_kernel, gpu_tile_configs
fn = _matmul_4bit_kernel.fn
cuobjdump, arch, x_type = sys.argv[1] or None, int(sys.argv[2]), sys.argv[3]
dtype = torch.float32 if x_type == "*fp32" else torch.bfloat16
# x, packed, absmax (uint8: nested), code, nested_absmax, nested_code, offset, bias, y
types = [x_type, "*u8", "*u8", "*fp32", "*fp32", "*fp32", "fp32", "*fp32", x_type] + ["i32"] * 8
out = []
for bm, bo, br, warps, stages in gpu_tile_configs(dtype):
    consts = dict(BLOCKSIZE=64, NESTED=True, HAS_BIAS=True, TRANSPOSE_W=False,
                  DOT_PRECISION="ieee" if x_type == "*fp32" else None,
                  DOT_UPCAST=False, INDEX_64=False, BLOCK_M=bm, BLOCK_O=bo, BLOCK_R=br,
                  GROUP_M=8)
    sig = dict(zip(fn.arg_names[:len(types)], types))
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    row = dict(config=[bm, bo, br, warps, stages], shared=k.metadata.shared, local=None)
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
        os.unlink(f.name)
        m = re.search(r"LOCAL:(\d+)", res.stdout)
        row["local"] = int(m.group(1)) if m else None
    out.append(row)
print(json.dumps(out))
"""


# Opt-in shared memory per block: 163 KiB on sm_80 (A100), 99 KiB on sm_86 and sm_89.
MAX_SHARED = {80: 163 * 1024, 86: MAX_SHARED_SM89, 89: MAX_SHARED_SM89}


# float32 needs more shared memory than bf16 in every config (a larger x tile and decoded W
# tile), so float32 is checked on each arch and bf16 once; the codegen of sm_80/86/89 is
# the same family (mma.sync, cp.async), the limits differ.
@pytest.mark.slow
@pytest.mark.parametrize("arch,x_type", [(89, "*bf16"), (89, "*fp32"), (86, "*fp32"),
                                         (80, "*fp32")])
def test_gemm_autotune_configs_fit(arch, x_type):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, find_cuobjdump(), str(arch), x_type],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such" in proc.stderr):
            pytest.skip("Triton cannot compile for CUDA here (no ptxas)")
        raise AssertionError(proc.stderr[-3000:])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) >= 6
    for row in rows:
        print(row)
        assert 0 < row["shared"] <= MAX_SHARED[arch], row
        if row["local"] is not None:
            assert row["local"] == 0, f"register spills (local memory) in {row}"


def test_float32_calls_are_tuned_over_the_float32_stage_counts():
    pytest.importorskip("triton")
    from qlora_kernels.triton import matmul_4bit as mm
    import torch
    configs = [mm._config(*c) for c in mm.GPU_TILE_CONFIGS]
    assert mm._fit_to_dtype(configs, {"x_ptr": torch.zeros(1, dtype=torch.bfloat16)}) is configs
    fit = mm._fit_to_dtype(configs, {"x_ptr": torch.zeros(1)})
    stages = [c.num_stages for c in fit]
    assert stages == [c[4] for c in mm.gpu_tile_configs(torch.float32)]
    assert stages != [c.num_stages for c in configs]  # the 128 KiB config is refitted
    assert [c.kwargs for c in fit] == [c.kwargs for c in configs]
