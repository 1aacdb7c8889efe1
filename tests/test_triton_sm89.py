"""The Triton GEMM's autotune candidates fit the target GPUs, checked without a GPU.

Each config of ``GPU_TILE_CONFIGS`` (qlora_kernels/triton/matmul_4bit.py) is compiled
ahead of time for sm_89 (RTX 4090; sm_86 has the same 99 KiB limit) with bf16 x and
double-quantized scales. A config needing more shared memory than a block may have would be
dropped by the autotuner at run time (out of resources) on every target GPU; one that spills
registers would be slow. The compile runs in a subprocess because the tests run Triton in
interpreter mode (tests/conftest.py), where kernels cannot be compiled. Spills are read with
cuobjdump (Triton's wheel ships one); skips where Triton cannot compile for CUDA here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

MAX_SHARED_SM89 = 99 * 1024  # bytes per block (opt-in maximum on sm_86 and sm_89)

SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora_kernels.triton.matmul_4bit import GPU_TILE_CONFIGS, _matmul_4bit_kernel
fn = _matmul_4bit_kernel.fn
types = ["*bf16", "*u8", "*u8", "*fp32", "*fp32", "*fp32", "fp32", "*bf16"] + ["i32"] * 8
cuobjdump = sys.argv[1] or None
out = []
for bm, bo, br, warps, stages in GPU_TILE_CONFIGS:
    consts = dict(BLOCKSIZE=64, NESTED=True, TRANSPOSE_W=False, DOT_PRECISION=None,
                  DOT_UPCAST=False, INDEX_64=False, BLOCK_M=bm, BLOCK_O=bo, BLOCK_R=br,
                  GROUP_M=8)
    sig = dict(zip(fn.arg_names[:len(types)], types))
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 89, 32),
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


def _cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the one Triton's wheel ships."""
    cands = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    for cand in cands:
        if cand and os.access(cand, os.X_OK):
            return cand
    return ""


@pytest.mark.slow
def test_gemm_autotune_configs_fit_sm89():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, _cuobjdump()], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such" in proc.stderr):
            pytest.skip("Triton cannot compile for CUDA here (no ptxas)")
        raise AssertionError(proc.stderr[-3000:])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) >= 6
    for row in rows:
        print(row)
        assert 0 < row["shared"] <= MAX_SHARED_SM89, row
        if row["local"] is not None:
            assert row["local"] == 0, f"register spills (local memory) in {row}"
