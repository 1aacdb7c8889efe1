"""Build qlora_kernels._C: CPU kernels always, CUDA kernels when torch and nvcc allow.

Environment variables:
  QLORA_KERNELS_SKIP_CUDA=1        build the CPU kernels only, even where CUDA is available
  QLORA_KERNELS_CUDA_ARCHS="8.6;8.9" CUDA targets (default 8.0;8.6;8.9;9.0)
  QLORA_KERNELS_DEBUG=1            -O0 -g builds
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def want_cuda() -> bool:
    if os.environ.get("QLORA_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        return False
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def extension():
    debug = os.environ.get("QLORA_KERNELS_DEBUG", "0") not in ("", "0")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=off: decode arithmetic must round like the PyTorch reference (no FMA).
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 for
    # torch 2.13, C++20 from 2.14).
    cxx = opt + ["-fopenmp", "-ffp-contract=off"]
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
                   glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(
        name="qlora_kernels._C",
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
    )
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("QLORA_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        nvcc = opt + ["--fmad=false", "-lineinfo"]
        return CUDAExtension(sources=sources, define_macros=[("QK_WITH_CUDA", "1")],
                             extra_compile_args={"cxx": cxx + ["-DQK_WITH_CUDA=1"], "nvcc": nvcc},
                             **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
