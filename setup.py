"""Build qlora_kernels._C against the PyTorch of the environment being installed into.

`pip install -e .` and `pip install .` need no flags. The build never takes torch from
pip's isolated build environment (torch is not a build requirement): it compiles against
the torch that the installing interpreter imports, found outside the isolation when pip
hides it. The extension records that torch in `_build_info.json` beside it, and
`qlora_kernels._extension` refuses a build made for another torch.

What is built: the CPU kernels always (they need a C++ compiler with OpenMP; without one
the package installs on its PyTorch reference kernels and says so at import), and the
CUDA kernels when torch has CUDA and a complete CUDA toolkit of the same major version is
found (`CUDA_HOME`/`CUDA_PATH`, the toolkit behind `nvcc` on PATH, `/usr/local/cuda`);
otherwise the CPU kernels with one warning saying how to enable CUDA.

Environment variables:
  QLORA_KERNELS_SKIP_CUDA=1        build the CPU kernels only, even where CUDA is available
  QLORA_KERNELS_CUDA_ARCHS="8.6;8.9" CUDA targets (default 7.5;8.0;8.6;8.9;9.0+PTX: cubins
                                   for T4 to H100, and PTX that newer GPUs such as Blackwell
                                   compile at load time)
  QLORA_KERNELS_DEBUG=1            -O0 -g builds
  MAX_JOBS=N                       parallel compile jobs (torch's BuildExtension)
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# A GPU without an image here gets one warning and the Triton kernels at run time
# (qlora_kernels/_extension.py: cuda_kernels_runnable).
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
BUILD_INFO = "_build_info.json"


def note(msg: str) -> None:
    print(f"qlora-kernels setup: {msg}", file=sys.stderr, flush=True)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def runtime_torch():
    """The torch of the environment being installed into, or None when it has none.

    Under pip's build isolation that environment's site-packages are hidden, but pip runs
    the build with the installing interpreter (sys.executable): asked without the
    isolation's PYTHONPATH, it reports its own sys.path, which is then searched after the
    build environment's. So the extension is always compiled against the torch it will be
    loaded into, never against one pip would download for the build.
    """
    try:
        import torch
        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = subprocess.run(
        [sys.executable, "-c", "import json, sys, torch; print(json.dumps(sys.path))"],
        env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    for path in json.loads(probe.stdout.strip().splitlines()[-1]):
        if path and path not in sys.path:
            sys.path.append(path)
    import torch
    return torch


def compiler_problem():
    """Why the C++ compiler cannot build the CPU kernels (None when it can)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        probe = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "probe")],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            return f"the C++ compiler {cxx!r} cannot build OpenMP code ({last})"
    return None


def _nvcc_toolkit_root(nvcc: str):
    """The toolkit an `nvcc` on PATH belongs to, also when it is a wrapper script."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.normpath(m.group(1).strip()) if m else None  # TOP is <root>/bin/..


def _toolkit_version(root: str):
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_cuda_toolkit(torch_cuda: str):
    """(root, None) for a usable CUDA toolkit, else (None, why not)."""
    candidates = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [_nvcc_toolkit_root(nvcc),
                       os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates.append("/usr/local/cuda")
    seen, problems = set(), []
    for root in candidates:
        if not root or os.path.realpath(root) in seen:
            continue
        seen.add(os.path.realpath(root))
        missing = [p for p in ("bin/nvcc", "include/cuda_runtime.h")
                   if not os.path.exists(os.path.join(root, p))]
        if missing:
            problems.append(f"{root} lacks {', '.join(missing)}")
            continue
        version = _toolkit_version(root)
        want = int(torch_cuda.split(".")[0])
        if version is None or version[0] != want:
            problems.append(f"{root} is CUDA {version and '.'.join(map(str, version))}, "
                            f"torch is built for CUDA {torch_cuda}")
            continue
        return root, None
    return None, "; ".join(problems) or "no CUDA toolkit found (no CUDA_HOME, nvcc or /usr/local/cuda)"


def cuda_plan(torch):
    """(toolkit root or None, why CUDA is not built or None)."""
    if os.environ.get("QLORA_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        return None, "disabled by QLORA_KERNELS_SKIP_CUDA"
    if torch.version.cuda is None:
        return None, "this torch has no CUDA"
    root, why = find_cuda_toolkit(torch.version.cuda)
    if root is None:
        note(f"WARNING: building the CPU kernels only: {why}. To build the CUDA kernels, install "
             f"the CUDA {torch.version.cuda.split('.')[0]}.x toolkit (with its headers) and set "
             "CUDA_HOME to it, then reinstall.")
    return root, why


def extension(torch, cuda_root):
    from torch.utils import cpp_extension

    debug = os.environ.get("QLORA_KERNELS_DEBUG", "0") not in ("", "0")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=off: decode arithmetic must round like the PyTorch reference (no FMA).
    # No -std flag: torch's BuildExtension adds the standard its headers need.
    cxx = opt + ["-fopenmp", "-ffp-contract=off"]
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
                   glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    kwargs = dict(name="qlora_kernels._C", include_dirs=[os.path.join(ROOT, "csrc", "include")],
                  extra_link_args=["-fopenmp"])
    if cuda_root is None:
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    # torch reads CUDA_HOME once, at import of cpp_extension; point it at the real toolkit
    # (a wrapper script's directory is not one).
    os.environ["CUDA_HOME"] = cuda_root
    cpp_extension.CUDA_HOME = cuda_root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("QLORA_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS))
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                    glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    return cpp_extension.CUDAExtension(
        sources=sources, define_macros=[("QK_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx + ["-DQK_WITH_CUDA=1"],
                            "nvcc": opt + ["--fmad=false", "-lineinfo"]},
        **kwargs)


def build_info(torch, cuda_kernels: bool, cuda_why):
    return {"torch": torch.__version__, "torch_git": torch.version.git_version,
            "torch_cuda": torch.version.cuda, "cuda_kernels": cuda_kernels,
            "cuda_skipped": None if cuda_kernels else cuda_why,
            "python": "%d.%d" % sys.version_info[:2]}


def build_command(torch, info):
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildWithRecord(base):
        """Builds the extension, then writes the torch it was built against beside it."""

        def build_extension(self, ext):
            super().build_extension(ext)
            self._write_record(os.path.dirname(self.get_ext_fullpath(ext.name)))

        def copy_extensions_to_source(self):
            # --inplace and editable installs build elsewhere, then copy the library here
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                package = ".".join(ext.name.split(".")[:-1])
                self._write_record(os.path.abspath(build_py.get_package_dir(package)))

        @staticmethod
        def _write_record(out_dir):
            tmp = os.path.join(out_dir, BUILD_INFO + ".tmp")
            with open(tmp, "w") as f:
                json.dump(info, f, indent=1)
            os.replace(tmp, os.path.join(out_dir, BUILD_INFO))

    return BuildWithRecord


def main():
    torch = runtime_torch()
    problem = "PyTorch is not installed (install torch first, then this package)" \
        if torch is None else compiler_problem()
    if problem is not None:
        note(f"WARNING: not building the compiled kernels: {problem}. The package installs and "
             "runs on its PyTorch reference kernels (slower); fix this and reinstall to build them.")
        setup()
        return
    cuda_root, cuda_why = cuda_plan(torch)
    info = build_info(torch, cuda_root is not None, cuda_why)
    note(f"building against torch {torch.__version__} "
         f"({'CPU + CUDA' if cuda_root else 'CPU'} kernels)")
    setup(ext_modules=[extension(torch, cuda_root)],
          cmdclass={"build_ext": build_command(torch, info)})


if __name__ == "__main__":  # setuptools runs setup.py as __main__; tests import it
    main()
