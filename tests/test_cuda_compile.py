"""Compile checks of the CUDA sources, for machines without a GPU.

* Every ``csrc/cuda/*.cu`` is compiled with nvcc for sm_86 and sm_89 (the project's flags:
  ``-std=c++17 --fmad=false -O3``) with ``-Xptxas -v``; a test fails on a compile error or
  when ptxas reports any register spill. The per-kernel registers and stack frames are
  printed (``pytest -s``) and recorded as test properties.
* ``slow``: the torch binding(s) ``csrc/cuda/*.cpp`` are syntax-checked with g++ against the
  headers of a CUDA build of torch (the CPU wheel's CUDA headers are incomplete), taken from
  ``$QK_TORCH_CUDA_INCLUDE`` or extracted once from ``pip download torch==2.14.1`` into
  ``~/.cache/qlora_kernels``; skipped when neither is possible.

Both skip cleanly where nvcc / g++ are missing.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from conftest import find_cuobjdump

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
BINDING_FILES = sorted(CUDA_DIR.glob("*.cpp"))


def _default_archs() -> tuple[str, ...]:
    """setup.py's DEFAULT_ARCHS as sm_XY names: every architecture the build ships code for."""
    text = (ROOT / "setup.py").read_text()
    archs = re.search(r'^DEFAULT_ARCHS = "([^"]+)"', text, re.M).group(1)
    return tuple("sm_" + a.replace("+PTX", "").replace(".", "") for a in archs.split(";"))


# ptxas' register allocation differs per architecture (a kernel spilled on sm_90 and on
# sm_75 but not on sm_86/sm_89), so every shipped one is checked.
ARCHS = _default_archs()
NVCC_FLAGS = ["-std=c++17", "--fmad=false", "-O3", "-Xptxas", "-v", "-c"]
TORCH_CUDA_VERSION = "2.14.1"  # a CUDA build whose headers the binding is checked against


def _find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _find_nvcc()


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """Per-kernel resources from ``ptxas -v`` output.

    Example:
        >>> out = parse_ptxas("ptxas info    : Function properties for k\\n"
        ...                   "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\\n"
        ...                   "ptxas info    : Used 40 registers, used 0 barriers")
        >>> out["k"]["spill_stores"], out["k"]["registers"]
        (4, 40)
    """
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
    return kernels


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    pretty = out.stdout.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def _compile(src: Path, arch: str):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, f"-arch={arch}", *NVCC_FLAGS, "-I", str(ROOT / "csrc" / "include"),
               str(src), "-o", os.path.join(tmp, "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled():
    """Every (file, arch) compiled once, in parallel (nvcc is mostly single-threaded)."""
    jobs = [(src, arch) for src in CU_FILES for arch in ARCHS]
    workers = max(1, min(len(jobs), os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda job: _compile(*job), jobs))
    return {(src.name, arch): res for (src, arch), res in zip(jobs, results)}


def test_parser_sees_spills():
    sample = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_86'\n"
              "ptxas info    : Function properties for _Z1kv\n"
              "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
              "ptxas info    : Used 255 registers, used 0 barriers, 392 bytes cmem[0]\n")
    assert parse_ptxas(sample) == {"_Z1kv": {"stack": 16, "spill_stores": 8, "spill_loads": 12,
                                             "registers": 255}}


def test_kernel_sources_exist():
    assert CU_FILES, "no csrc/cuda/*.cu found"
    for src in CU_FILES:  # the format is defined once: every kernel file builds on qk_format.h
        text = src.read_text()
        assert "qk_format.h" in text or "qk_device.cuh" in text, f"{src.name} must include qk_format.h"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_without_spills(compiled, src, arch, record_property):
    rc, log = compiled[(src.name, arch)]
    assert rc == 0, f"nvcc failed for {src.name} ({arch}):\n{log[-6000:]}"
    kernels = parse_ptxas(log)
    assert kernels, f"no ptxas -v report for {src.name} ({arch}):\n{log[-3000:]}"
    incomplete = [k for k, v in kernels.items() if "spill_stores" not in v]
    assert not incomplete, f"ptxas report without spill line for {incomplete}"
    names = _demangle(sorted(kernels))
    print(f"\n{src.name} [{arch}]: registers / stack frame / spills per kernel")
    for mangled in sorted(kernels):
        v = kernels[mangled]
        print(f"  {v.get('registers', '?'):>3} regs  {v['stack']:>4} B stack  "
              f"{v['spill_stores']}/{v['spill_loads']} B spill  {names[mangled][:110]}")
    record_property("max_registers", max(v.get("registers", 0) for v in kernels.values()))
    record_property("max_stack_frame", max(v["stack"] for v in kernels.values()))
    spills = {names[k]: v for k, v in kernels.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spills, f"register spills in {src.name} ({arch}): {spills}"


# ------------------------------------------------------------------ binding syntax check
def _cuda_include_dir() -> str | None:
    cands = [os.path.join(os.environ.get("CUDA_HOME", ""), "include"), "/usr/local/cuda/include"]
    if NVCC:
        cands.append(os.path.join(os.path.dirname(os.path.realpath(NVCC)), "..", "include"))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "cuda_runtime_api.h")):
            return os.path.normpath(c)
    return None


def _torch_cuda_include() -> str | None:
    """torch/include of a CUDA build of torch: env override, cache, or extracted from the wheel."""
    env = os.environ.get("QK_TORCH_CUDA_INCLUDE")
    if env:
        return env if os.path.isfile(os.path.join(env, "c10", "cuda", "CUDAStream.h")) else None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_kernels" / \
        f"torch-{TORCH_CUDA_VERSION}-include"
    inc = cache / "torch" / "include"
    if (inc / "c10" / "cuda" / "CUDAStream.h").is_file():
        return str(inc)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            f"torch=={TORCH_CUDA_VERSION}", "-d", tmp],
                           check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError):
            return None
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if not wheels:
            return None
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache.parent))  # same filesystem: atomic rename
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(staging, [n for n in zf.namelist() if n.startswith("torch/include/")])
        if not (staging / "torch" / "include" / "c10" / "cuda" / "CUDAStream.h").is_file():
            shutil.rmtree(staging, ignore_errors=True)
            return None  # a CPU-only wheel: no c10/cuda headers
        if not cache.exists():
            os.replace(staging, cache)  # atomic: a half-extracted cache is never seen
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return str(inc)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("src", BINDING_FILES, ids=lambda p: p.name)
def test_binding_syntax_against_torch_cuda_headers(src):
    cuda_inc = _cuda_include_dir()
    if cuda_inc is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime_api.h) not found")
    torch_inc = _torch_cuda_include()
    if torch_inc is None:
        pytest.skip(f"headers of a CUDA build of torch {TORCH_CUDA_VERSION} not obtainable")
    # torch 2.14 headers require C++20; the narrow includes keep this to ~15 s of CPU.
    cmd = ["g++", "-fsyntax-only", "-std=c++20", "-Wall", "-DQK_WITH_CUDA=1",
           "-I", torch_inc, "-I", os.path.join(torch_inc, "torch", "csrc", "api", "include"),
           "-I", cuda_inc, "-I", str(ROOT / "csrc" / "include"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{src.name} does not compile:\n{proc.stderr[-6000:]}"
    own = [ln for ln in proc.stderr.splitlines() if f"{src.name}:" in ln and "warning" in ln]
    assert not own, "warnings in the binding:\n" + "\n".join(own)


# ------------------------------------------------------------------ default build targets
def _default_arch_flags() -> list[str]:
    """nvcc -gencode flags of setup.py's DEFAULT_ARCHS, as torch's BuildExtension makes them."""
    text = (ROOT / "setup.py").read_text()
    archs = re.search(r'^DEFAULT_ARCHS = "([^"]+)"', text, re.M).group(1)
    flags = []
    for a in archs.split(";"):
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_default_build_has_sm75_images_and_ptx_for_newer_gpus(src, tmp_path):
    # T4 (sm_75) runs the cubin; GPUs newer than the newest target (Blackwell) JIT-compile
    # the PTX; anything else gets the runtime probe's fallback to Triton
    cuobjdump = find_cuobjdump()
    if not cuobjdump:
        pytest.skip("cuobjdump not found")
    obj = tmp_path / "out.o"
    flags = _default_arch_flags()
    assert "-gencode=arch=compute_75,code=sm_75" in flags
    proc = subprocess.run([NVCC, *flags, "-std=c++17", "--fmad=false", "-O3", "-c", "-I",
                           str(ROOT / "csrc" / "include"), str(src), "-o", str(obj)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    elf = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True)
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(obj)], capture_output=True, text=True)
    for sm in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90"):
        assert f".{sm}." in elf.stdout, (sm, elf.stdout)
    newest = max(int(f.split("compute_")[1].split(",")[0]) for f in flags)
    assert f"sm_{newest}" in ptx.stdout, ptx.stdout  # cuobjdump names PTX by its target
    assert ptx.stdout.count(".ptx") == 1, ptx.stdout  # PTX for the newest arch only
