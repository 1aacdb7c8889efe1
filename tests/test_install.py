"""setup.py's decisions (which torch, which compiler, which CUDA toolkit) and the import-time
refusal of a build made for another torch. The whole `pip install .` path is exercised by
scripts/check_install.sh, which CI runs in a fresh environment."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("qk_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": nothing is built
    return mod


def _script(path, body):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + textwrap.dedent(body))
    os.chmod(path, 0o755)


def _fake_toolkit(root, release="13.0", header=True):
    """A toolkit directory whose nvcc answers --version and -dryrun like the real one."""
    _script(os.path.join(root, "bin", "nvcc"), f"""\
        case "$1" in
          --version) echo "Cuda compilation tools, release {release}, V{release}.88";;
          -dryrun) echo "#\\$ TOP={root}/bin/.." >&2;;
        esac
        """)
    if header:
        os.makedirs(os.path.join(root, "include"), exist_ok=True)
        open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()


def test_toolkit_found_behind_an_nvcc_wrapper_script(setup_py, tmp_path, monkeypatch):
    root = str(tmp_path / "cuda-13.0")
    _fake_toolkit(root)
    # like /usr/local/bin/nvcc here: a script in a directory that is no toolkit
    _script(str(tmp_path / "wrap" / "nvcc"), f'exec {root}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrap'}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(os.path, "exists", _hide_usr_local_cuda(os.path.exists))
    found, why = setup_py.find_cuda_toolkit("13.0")
    assert (found, why) == (root, None)


def _hide_usr_local_cuda(exists):
    return lambda p: False if str(p).startswith("/usr/local/cuda") else exists(p)


def test_incomplete_or_mismatched_toolkit_is_refused_with_the_reason(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(os.path, "exists", _hide_usr_local_cuda(os.path.exists))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    no_headers = str(tmp_path / "noheaders")
    _fake_toolkit(no_headers, header=False)
    monkeypatch.setenv("CUDA_HOME", no_headers)
    found, why = setup_py.find_cuda_toolkit("13.0")
    assert found is None and "lacks include/cuda_runtime.h" in why
    old = str(tmp_path / "cuda12")
    _fake_toolkit(old, release="12.4")
    monkeypatch.setenv("CUDA_HOME", old)
    found, why = setup_py.find_cuda_toolkit("13.0")
    assert found is None and "is CUDA 12.4" in why and "built for CUDA 13.0" in why


def test_cpu_torch_builds_cpu_kernels_without_a_warning(setup_py, monkeypatch, capsys):
    monkeypatch.delenv("QLORA_KERNELS_SKIP_CUDA", raising=False)
    fake_torch = type("T", (), {"version": type("V", (), {"cuda": None})})
    assert setup_py.cuda_plan(fake_torch) == (None, "this torch has no CUDA")
    assert "WARNING" not in capsys.readouterr().err


def test_missing_compiler_or_openmp_is_named(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert "no C++ compiler" in setup_py.compiler_problem()
    no_omp = str(tmp_path / "cxx-no-omp")
    _script(no_omp, 'echo "error: unsupported option -fopenmp" >&2; exit 1\n')
    monkeypatch.setenv("CXX", no_omp)
    why = setup_py.compiler_problem()
    assert "cannot build OpenMP code" in why and "unsupported option -fopenmp" in why


def test_torch_hidden_by_build_isolation_is_found_in_the_installing_environment(tmp_path):
    # pip's isolation: PYTHONNOUSERSITE and a sys.path without the environment's site-packages
    code = textwrap.dedent(f"""
        import sys, importlib.util
        sys.path = [p for p in sys.path if "site-packages" not in p] + [{str(tmp_path)!r}]
        try:
            import torch
            raise SystemExit("torch still importable: the test set-up is wrong")
        except ImportError:
            pass
        spec = importlib.util.spec_from_file_location("s", {os.path.join(ROOT, 'setup.py')!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        print(m.runtime_torch().__version__)
        """)
    import setuptools  # the build environment has setuptools, not torch
    for name in ("setuptools", "_distutils_hack", "pkg_resources"):
        src = os.path.join(os.path.dirname(os.path.dirname(setuptools.__file__)), name)
        if os.path.exists(src):
            os.symlink(src, tmp_path / name)
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == torch.__version__


def test_build_record_matches_the_running_torch():
    if not qk.EXTENSION_LOADED:
        pytest.skip(f"extension not loaded here: {_extension.LOAD_ERROR}")
    assert _extension.BUILD_INFO["torch"] == torch.__version__
    assert _extension.BUILD_INFO["torch_git"] == torch.version.git_version


@pytest.mark.parametrize("record", ["other-torch", "missing"])
def test_a_build_for_another_torch_is_refused_before_loading(tmp_path, record):
    if not qk.EXTENSION_LOADED:
        pytest.skip(f"extension not loaded here: {_extension.LOAD_ERROR}")
    pkg = tmp_path / "qlora_kernels"
    shutil.copytree(os.path.dirname(qk.__file__), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    info_path = pkg / "_build_info.json"
    if record == "missing":
        info_path.unlink()
    else:
        info = json.loads(info_path.read_text())
        info["torch"] = "1.0.0"
        info_path.write_text(json.dumps(info))
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import qlora_kernels as qk, torch\n"
            "print(qk.EXTENSION_LOADED, qk.__file__)\n"
            "p, s = qk.quantize_4bit(torch.randn(100), blocksize=64)\n"
            "print(torch.ops.qlora_kernels.quantize_4bit.default._schema.name)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    loaded, path = out.stdout.split("\n")[0].split()
    assert loaded == "False" and path.startswith(str(tmp_path))
    expected = "built against torch 1.0.0" if record == "other-torch" else "no build record"
    assert expected in out.stderr and "pip install -e ." in out.stderr
    assert out.stderr.count("not using the compiled extension") == 1
