"""The runtime probe of the compiled CUDA kernels (qlora_kernels/_extension.py:
cuda_kernels_runnable): a GPU the build has no image for (e.g. a T4 or a Blackwell card
against an sm_80..90 build) gets one warning and the Triton kernels, or the reference,
instead of "no kernel image is available" from every op. Without a GPU the probe's launch
is simulated; the override of the compiled kernels is checked in a fresh process.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from qlora_kernels import _extension, ops
from qlora_kernels.backends import available_backends

from conftest import HAS_CUDA

NO_IMAGE = "CUDA error: no kernel image is available for execution on the device"


@pytest.fixture
def fresh_probe(monkeypatch):
    """A probe state as at first use, with compiled CUDA kernels 'built'."""
    monkeypatch.setattr(_extension, "_CUDA_KERNELS_BUILT", True)
    monkeypatch.setattr(_extension, "_runnable", {})
    monkeypatch.setattr(_extension, "_replaced", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    replaced = []
    monkeypatch.setattr(ops, "replace_cuda_kernels", lambda: replaced.append(True))
    return replaced


def test_no_image_warns_once_and_routes_to_the_fallbacks(fresh_probe, monkeypatch):
    calls = []

    def no_image(device):
        calls.append(device)
        raise RuntimeError(NO_IMAGE)

    monkeypatch.setattr(_extension, "_probe_launch", no_image)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _extension.cuda_kernels_runnable(torch.device("cuda", 0)) is False
        assert _extension.cuda_kernels_runnable(torch.device("cuda", 0)) is False
        assert _extension.cuda_kernels_runnable(torch.device("cuda", 1)) is False
    msgs = [str(w.message) for w in rec if "no image" in str(w.message)]
    assert len(msgs) == 1 and "sm_75" in msgs[0] and "QLORA_KERNELS_CUDA_ARCHS=7.5" in msgs[0]
    assert len(calls) == 1 and fresh_probe == [True]  # probed once, overridden once
    assert "cuda" not in available_backends("cuda")


def test_a_runnable_build_is_probed_once_per_device(fresh_probe, monkeypatch):
    calls = []
    monkeypatch.setattr(_extension, "_probe_launch", calls.append)
    assert _extension.cuda_kernels_runnable(torch.device("cuda", 0))
    assert _extension.cuda_kernels_runnable(torch.device("cuda", 0))
    assert _extension.cuda_kernels_runnable(torch.device("cuda", 1))
    assert [d.index for d in calls] == [0, 1] and fresh_probe == []


def test_other_errors_are_not_taken_for_a_missing_image(fresh_probe, monkeypatch):
    def oom(device):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(_extension, "_probe_launch", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        _extension.cuda_kernels_runnable(torch.device("cuda", 0))
    assert fresh_probe == []


OVERRIDE_SCRIPT = r"""
import torch, qlora_kernels
from qlora_kernels import ops
ops.replace_cuda_kernels()
ops.replace_cuda_kernels()
for name in ("quantize_4bit", "dequantize_4bit", "gemv_4bit", "adamw_step_", "quantize_8bit"):
    dump = torch._C._dispatch_dump("qlora_kernels::" + name)
    line = [l for l in dump.splitlines() if l.startswith("CUDA:")]
    assert line and "ops.py" in line[0], (name, dump)
if torch.cuda.is_available():
    from qlora_kernels.backends import reference as ref
    x = torch.randn(1000)
    p, a = torch.ops.qlora_kernels.quantize_4bit(x.cuda(), 64, "nf4")
    p_ref, a_ref = ref.quantize_4bit(x, 64, "nf4")
    assert torch.equal(p.cpu(), p_ref) and torch.equal(a.cpu(), a_ref)
print("ok")
"""


def test_replacing_the_compiled_kernels_registers_stand_ins_for_cuda():
    proc = subprocess.run([sys.executable, "-c", OVERRIDE_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_the_build_runs_on_this_gpu():
    # the GPU check builds for the GPU it finds: the probe must pass there
    if not _extension.cuda_kernels_built():
        pytest.skip("built without CUDA kernels")
    assert _extension.cuda_kernels_runnable(torch.device("cuda", 0))
    assert available_backends("cuda")[0] == "cuda"
