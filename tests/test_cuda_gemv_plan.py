"""The launch plan of the CUDA 4-bit GEMV (csrc/cuda/gemv_plan.h), checked on the CPU:
tests/cpp/gemv_plan_test.cpp checks, for the shared-memory limits of sm_86/89 and sm_90,
that x is staged in passes when it does not fit (every element once, inside the
allocation), that the tile of rows is never shrunk, and that gridDim.y stays within
65,535 with a grid-stride over row tiles. GPU machines run the kernels in
tests/test_cuda_ops.py. Skips where no C++ compiler is installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_gemv_launch_plan_stages_every_element_once_within_limits(tmp_path):
    exe = tmp_path / "gemv_plan_test"
    build = subprocess.run(
        [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'cuda'}",
         str(ROOT / "tests" / "cpp" / "gemv_plan_test.cpp"), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr
    assert int(run.stdout.split()[1]) > 2000  # every limit x shape x blocksize case ran
