"""Routing: a backend override (``qk.use_backend``, ``qk.set_backend``, the environment
variable) reaches every op through the public API, for each available backend.

An overriding backend (reference, Triton) is observed by wrapping its functions before the
override registers them: each public call must run the selected backend's implementation of
its op. Selecting the compiled kernels ("cpu") inside a reference override must run none of
the reference's functions.
"""
import os
import subprocess
import sys

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import backends
from qlora_kernels.backends import reference

from conftest import HAS_CUDA

CPU_BACKENDS = backends.available_backends("cpu")


def _weight(rng, n=48, k=80):
    return qk.quantize_4bit(torch.randn(n, k, generator=rng), blocksize=64)


def _params(rng, n=300):
    p = torch.nn.Parameter(torch.randn(n, generator=rng))
    p.grad = torch.randn(n, generator=rng)
    return p


# op name -> a call through the public API that must reach that op
def _call_quantize_4bit(rng):
    qk.quantize_4bit(torch.randn(300, generator=rng), double_quant=False)


def _call_dequantize_4bit(rng):
    qk.dequantize_4bit(*_weight(rng))


def _call_dequantize_4bit_out(rng):
    packed, state = _weight(rng)
    qk.dequantize_4bit(packed, state, out=torch.empty(state.numel))


def _call_quantize_8bit(rng):
    qk.quantize_blockwise(torch.randn(300, generator=rng))


def _call_dequantize_8bit(rng):
    q, absmax = qk.quantize_blockwise(torch.randn(300, generator=rng))
    qk.dequantize_blockwise(q, absmax)


def _call_gemv_4bit(rng):
    packed, state = _weight(rng)
    a, c, bs, na, nc, off = state.op_args()
    torch.ops.qlora_kernels.gemv_4bit(torch.randn(1, 80, generator=rng), packed, a, c, bs, 48,
                                      na, nc, off)


def _call_matmul_4bit(rng):
    with torch.no_grad():
        qk.matmul_4bit(torch.randn(5, 80, generator=rng), *_weight(rng))


def _call_linear4bit(rng):
    lin = qk.Linear4bit.from_linear(torch.nn.Linear(80, 48))
    with torch.no_grad():
        lin(torch.randn(2, 80, generator=rng))


def _call_matmul_4bit_backward(rng):
    x = torch.randn(5, 80, generator=rng, requires_grad=True)
    qk.matmul_4bit(x, *_weight(rng)).sum().backward()


def _call_adamw(rng):
    qk.optim.AdamW([_params(rng)]).step()


def _call_adamw8bit(rng):
    qk.optim.AdamW8bit([_params(rng, 5000)], min_8bit_size=1).step()


CALLS = {
    "quantize_4bit": _call_quantize_4bit,
    "dequantize_4bit": _call_dequantize_4bit,
    "dequantize_4bit_out": _call_dequantize_4bit_out,
    "quantize_8bit": _call_quantize_8bit,
    "dequantize_8bit": _call_dequantize_8bit,
    "gemv_4bit": _call_gemv_4bit,
    "matmul_4bit": _call_matmul_4bit,
    "matmul_4bit (Linear4bit)": _call_linear4bit,
    "matmul_4bit_backward": _call_matmul_4bit_backward,
    "adamw_step_ (AdamW)": _call_adamw,
    "adamw8bit_step_ (AdamW8bit)": _call_adamw8bit,
}
OVERRIDING = [b for b in ("reference", "triton") if b in CPU_BACKENDS]


def _spy_on(backend_name, monkeypatch):
    """Wrap every function the backend's override_impls() returns; returns the call log."""
    module = reference if backend_name == "reference" else __import__(
        "qlora_kernels.backends.triton", fromlist=["override_impls"])
    calls = []
    impls = module.override_impls()

    def wrap(op, fn):
        def spy(*args):
            calls.append(op)
            return fn(*args)
        return spy

    spied = {op: wrap(op, fn) for op, fn in impls.items()}
    monkeypatch.setattr(module, "override_impls", lambda: spied)
    return calls


@pytest.mark.parametrize("backend", OVERRIDING)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_override_reaches_every_op(backend, call, monkeypatch, rng):
    if backend == "triton" and "8bit_step" in call:
        pytest.skip("8-bit AdamW has no Triton kernel (its reference step is checked with "
                    "the reference backend)")
    calls = _spy_on(backend, monkeypatch)
    with qk.use_backend(backend):
        assert qk.current_backend() == backend
        CALLS[call](rng)
    op = call.split(" ")[0]
    # AdamW batches its params into the multi-tensor op where the build has its kernel
    accepted = {op, "adamw_step_multi_"} if op == "adamw_step_" else {op}
    assert accepted & set(calls), f"{call} under {backend} ran {calls}"
    assert qk.current_backend() is None


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("call", sorted(CALLS))
def test_compiled_backend_inside_reference_override(call, monkeypatch, rng):
    calls = _spy_on("reference", monkeypatch)
    with qk.use_backend("reference"):
        with qk.use_backend("cpu"):
            CALLS[call](rng)
        assert not calls, f"use_backend('cpu') still ran the reference for {calls}"
        assert qk.current_backend() == "reference"


def test_backend_argument_and_set_backend(monkeypatch, rng):
    calls = _spy_on("reference", monkeypatch)
    qk.quantize_4bit(torch.randn(100, generator=rng), backend="torch")
    assert calls == ["quantize_4bit", "quantize_8bit"] and qk.current_backend() is None
    qk.set_backend("torch")
    try:
        qk.dequantize_blockwise(*qk.quantize_blockwise(torch.randn(100, generator=rng)))
    finally:
        qk.set_backend(None)
    assert calls[2:] == ["quantize_8bit", "dequantize_8bit"]
    with pytest.raises(ValueError, match="unknown backend"):
        qk.set_backend("numpy")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="not available for cpu"):
            qk.quantize_4bit(torch.randn(64), backend="cuda")


def test_results_under_reference_override_equal_the_reference(rng):
    """The override changes which code runs, not the format: every public result equals
    the reference functions called directly."""
    w = torch.randn(48, 80, generator=rng)
    with qk.use_backend("reference"):
        packed, state = qk.quantize_4bit(w, double_quant=False)
        got = qk.dequantize_4bit(packed, state)
        x = torch.randn(3, 80, generator=rng)
        y = qk.matmul_4bit(x, packed, state)
    p_ref, a_ref = reference.quantize_4bit(w, 64, "nf4")
    assert torch.equal(packed, p_ref) and torch.equal(state.absmax, a_ref)
    w_ref = reference.dequantize_4bit(p_ref, a_ref, state.code, 64, w.numel(), torch.float32)
    assert torch.equal(got.view(-1), w_ref)
    assert torch.equal(y, (x @ w_ref.view(48, 80).T))


def test_environment_variable_selects_the_reference():
    code = ("import qlora_kernels as qk, torch; from qlora_kernels.backends import reference;"
            "calls = []; f = reference.override_impls;"
            "reference.override_impls = lambda: {k: (lambda *a, k=k, g=g: calls.append(k) or g(*a))"
            " for k, g in f().items()};"
            "import importlib; qk.set_backend(None); qk.backends.apply_environment();"
            "p, s = qk.quantize_4bit(torch.randn(64, 64)); qk.matmul_4bit(torch.randn(1, 64), p, s);"
            "print(qk.current_backend(), sorted(set(calls)))")
    env = dict(os.environ, QLORA_KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "reference"
    assert "matmul_4bit" in out.stdout and "quantize_4bit" in out.stdout
