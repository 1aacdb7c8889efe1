"""The CUDA kernels of csrc/cuda, run on the CPU under emulation, against the references.

tests/cuda_emulation.py compiles quantize_kernels.cu, gemv_kernels.cu and adamw_kernels.cu
with g++ for the host (csrc/emulation: one fiber per CUDA thread, a block at a time, threads
in a random order between barriers, shared memory poisoned at each block start, shuffles
checked lane by lane, launches validated against the emulated arch) and calls the same
launchers the torch binding calls. Quantize / dequantize must equal the PyTorch reference
bit for bit; GEMV is held to the tolerance of the GPU tests; AdamW must equal the CPU
kernel bit for bit (the same element math, IEEE sqrt) and the Python reference to an ulp.
Marked ``emulated``; skips where g++ / binutils are missing.
"""
from __future__ import annotations

import os
import platform
import shutil
import zlib

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.backends import reference as ref
from qlora_kernels.formats import dynamic_map, fp8_e4m3_map
from qlora_kernels.backends.reference import adamw as optim_ref

import cuda_emulation as ce
from conftest import DTYPES
from cuda_emulation import DTYPE_CODE, QUANT_TYPE_CODE, Guarded, placed, ptr
from test_cuda_ops import _quantized, _randn, assert_gemv_close

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(ce.CXX is None or shutil.which("objcopy") is None or
                       shutil.which("objdump") is None, reason="needs g++ and binutils"),
    pytest.mark.skipif(platform.system() != "Linux", reason="the fibers use glibc's ucontext"),
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@pytest.fixture(scope="module")
def emu_lib():
    return ce.EmulatedCuda(ce.build())


@pytest.fixture
def emu(emu_lib):
    """The library emulating sm_90, its thread order seeded per test ($QK_EMU_SEED varies it)."""
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()) + \
        int(os.environ.get("QK_EMU_SEED", "0"))
    emu_lib.configure(90, seed)
    return emu_lib


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what=""):
    """Bit-identical, except that NaN equals any NaN (payloads are the host's in the reference)."""
    got, want = got.reshape(-1), want.reshape(-1)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = torch.zeros_like(want, dtype=torch.bool)
    if want.is_floating_point():
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), f"NaN positions differ {what}"
    diff = (_bits(got) != _bits(want)) & ~nan
    assert not bool(diff.any()), \
        f"{int(diff.sum())} of {diff.numel()} differ {what}, first at {int(diff.nonzero()[0])}"


def _sizes(bs):
    """One element, a partial block, an odd size over several blocks."""
    return (1, 2 * bs - 1, 3 * bs + 7)


# ------------------------------------------------------------------ the emulation itself
def test_emulation_runs_barriers_and_shuffles(emu):
    out = Guarded(256, torch.float32)
    emu.call("probe_launch", 2, 1, 1, 256, 0, 1, ptr(out.tensor))
    t = torch.arange(256)
    want = ((255 - t) + (255 - (t ^ 1))).float()
    assert torch.equal(out.check(), want)


def test_emulation_exposes_a_missing_barrier(emu):
    """Without the barrier some threads read shared memory before it is written: poison."""
    out = Guarded(256, torch.float32)
    emu.call("probe_launch", 1, 1, 1, 256, 0, 0, ptr(out.tensor))
    assert bool(torch.isnan(out.check()).any())


@pytest.mark.parametrize("mode,match", [(2, "deadlock.*exited"), (3, "not in its mask")])
def test_emulation_checks_shuffle_masks(emu, mode, match):
    out = Guarded(256, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        emu.call("probe_launch", 1, 1, 1, 256, 0, mode, ptr(out.tensor))
    emu.call("probe_launch", 1, 1, 1, 256, 0, 1, ptr(out.tensor))  # the fibers start afresh
    assert not bool(torch.isnan(out.check()).any())


def test_build_key_follows_every_source(tmp_path, monkeypatch):
    """An edited kernel or header gets a new cache entry: the tests never run a stale build."""
    shutil.copytree(ce.ROOT / "csrc", tmp_path / "csrc")
    for name, sub in (("ROOT", ""), ("CUDA_DIR", "csrc/cuda"), ("EMU_DIR", "csrc/emulation"),
                      ("INCLUDE_DIR", "csrc/include")):
        monkeypatch.setattr(ce, name, tmp_path / sub)
    keys = {ce.build_key()}
    for rel in ("csrc/cuda/gemv_kernels.cu", "csrc/cuda/qk_device.cuh",
                "csrc/include/qk_format.h", "csrc/emulation/cuda_emu.cpp"):
        with open(tmp_path / rel, "a") as f:
            f.write("\n")
        keys.add(ce.build_key())
    assert len(keys) == 5


@pytest.mark.parametrize("grid,threads,smem,match", [
    ((1, 65536, 1), 256, 0, "invalid launch configuration"),
    ((1, 1, 65536), 256, 0, "invalid launch configuration"),
    ((0, 1, 1), 256, 0, "invalid launch configuration"),
    ((1, 1, 1), 2048, 0, "invalid launch configuration"),
    ((1, 1, 1), 128, 0, "256-thread blocks only"),
    ((1, 1, 1), 256, 48 * 1024 + 4, "dynamic shared memory"),
    ((1, 1, 1), 256, 47 * 1024 + 4, "beside 1024 static"),  # the probe's static 1 KiB counts
])
def test_emulation_validates_launches(emu, grid, threads, smem, match):
    out = Guarded(256, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        emu.call("probe_launch", *grid, threads, smem, 1, ptr(out.tensor))
    assert bool((out.check() == 0).all())  # rejected before any block ran


# ------------------------------------------------------------------ quantize_4bit
def _quantize_4bit(emu, x, bs, quant_type, packed_offset=0):
    n = x.numel()
    packed = Guarded((n + 1) // 2, torch.uint8, packed_offset)
    absmax = Guarded(-(-n // bs), torch.float32)
    emu.call("quantize_4bit", ptr(x), DTYPE_CODE[x.dtype], n, bs, QUANT_TYPE_CODE[quant_type],
             ptr(packed.tensor), ptr(absmax.tensor))
    return packed.check(), absmax.check()


@pytest.mark.parametrize("quant_type", ("nf4", "fp4", "int4"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_every_blocksize(emu, dtype, quant_type):
    for bs in BLOCKSIZES:
        for n in _sizes(bs):
            x = _randn(n, dtype, seed=bs + n, scale=3.0)
            p_ref, a_ref = ref.quantize_4bit(x, bs, quant_type)
            # aligned (16-byte loads, 4-byte stores), then misaligned input and packed output
            for x_off, p_off in ((0, 0), (x.element_size(), 1)):
                p, a = _quantize_4bit(emu, placed(x, x_off), bs, quant_type, p_off)
                assert_same_bits(a, a_ref, (bs, n, x_off))
                assert_same_bits(p, p_ref, (bs, n, x_off))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_many_blocks_and_nan(emu, dtype):
    n = 333 * 77
    x = _randn(n, dtype, seed=9, scale=2.0)
    x[70] = float("nan")
    x[200] = float("inf")
    x[n - 1] = float("nan")  # the last, partial block
    for bs in (64, 256):
        p_ref, a_ref = ref.quantize_4bit(x, bs, "nf4")
        p, a = _quantize_4bit(emu, x, bs, "nf4")
        assert_same_bits(a, a_ref, bs)
        assert_same_bits(p, p_ref, bs)


# ------------------------------------------------------------------ dequantize_4bit
def _state(n, bs, quant_type, seed, nested, dq_code="fp8"):
    """A reference-quantized weight: (packed, absmax, code, nested tensors or Nones, offset)."""
    packed, *rest = _quantized(n, bs, quant_type, seed, nested, dq_code)
    return (packed.reshape(-1), *rest)


def _dequantize_4bit(emu, packed, absmax, code, nq, ncode, offset, bs, n, dtype, out_off=0):
    out = Guarded(n, dtype, out_off, fill=float("nan"))
    nested = nq is not None
    emu.call("dequantize_4bit", ptr(packed), None if nested else ptr(absmax),
             ptr(absmax) if nested else None, ptr(nq), ptr(ncode), offset, ptr(code), n, bs,
             DTYPE_CODE[dtype], ptr(out.tensor))
    return out.check()


@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_every_blocksize(emu, dtype, nested):
    for bs, qt in zip(BLOCKSIZES, ("nf4", "fp4", "int4") * 3):
        for n in _sizes(bs) + (333 * 77,) * (bs == 64):
            packed, absmax, code, nq, nc, off = _state(n, bs, qt, seed=n + bs, nested=nested,
                                                       dq_code="fp8" if bs < 512 else "dynamic")
            want = ref.dequantize_4bit(packed, absmax, code, bs, n, dtype, nq, nc, off)
            got = _dequantize_4bit(emu, packed, absmax, code, nq, nc, off, bs, n, dtype)
            assert_same_bits(got, want, (bs, n, qt))
            # misaligned output, then misaligned packed bytes: the scalar paths
            got = _dequantize_4bit(emu, packed, absmax, code, nq, nc, off, bs, n, dtype,
                                   out_off=dtype.itemsize)
            assert_same_bits(got, want, (bs, n, qt, "out misaligned"))
            got = _dequantize_4bit(emu, placed(packed, 1), absmax, code, nq, nc, off, bs, n,
                                   dtype)
            assert_same_bits(got, want, (bs, n, qt, "packed misaligned"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_nan_block_gives_the_gpu_nan(emu, dtype):
    """A NaN absmax decodes to NaN through __fmul_rn: the GPU's canonical NaN, then rounded."""
    packed, absmax, code, *_ = _state(300, 64, "nf4", seed=3, nested=False)
    absmax[2] = float("nan")
    got = _dequantize_4bit(emu, packed, absmax, code, None, None, 0.0, 64, 300, dtype)
    want = ref.dequantize_4bit(packed, absmax, code, 64, 300, dtype)
    assert_same_bits(got, want)
    canonical = 0x7FFFFFFF if dtype == torch.float32 else 0x7FFF
    assert bool((_bits(got[128:192]).long() == canonical).all())


# ------------------------------------------------------------------ 8-bit
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_8bit(emu, dtype):
    for code in (dynamic_map(True), fp8_e4m3_map()):
        for bs in (1, 64, 100, 256, 4096):
            for n in (1, 65, min(bs * 37 + 5, 20_000)):
                x = _randn(n, dtype, seed=n + bs, scale=4.0)
                if n > 100:
                    x[n // 2] = float("nan")
                q_ref, a_ref = ref.quantize_8bit(x, code, bs)
                q, a = Guarded(n, torch.uint8), Guarded(-(-n // bs), torch.float32)
                x_in = placed(x, x.element_size() * (n % 2))  # odd n: misaligned input
                emu.call("quantize_8bit", ptr(x_in), DTYPE_CODE[dtype], n, bs, ptr(code),
                         ptr(q.tensor), ptr(a.tensor))
                assert_same_bits(a.check(), a_ref, (bs, n))
                assert_same_bits(q.check(), q_ref, (bs, n))
                for out_dtype in DTYPES:
                    want = ref.dequantize_8bit(q_ref, a_ref, code, bs, out_dtype)
                    for q_off, out_off in ((0, 0), (1, 0), (0, out_dtype.itemsize)):
                        out = Guarded(n, out_dtype, out_off, fill=float("nan"))
                        q_in = placed(q_ref, q_off)
                        emu.call("dequantize_8bit", ptr(q_in), ptr(a_ref), ptr(code), n, bs,
                                 DTYPE_CODE[out_dtype], ptr(out.tensor))
                        assert_same_bits(out.check(), want, (bs, n, out_dtype, q_off, out_off))


# ------------------------------------------------------------------ gemv_4bit
def _gemv(emu, M, K, N, dtype, bs, nested, seed, packed_offset=0, bias=False):
    """Runs the emulated gemv_4bit and checks it as tests/test_cuda_ops.py does on a GPU."""
    packed, absmax, code, nq, nc, off = _state(N * K, bs, "nf4", seed=seed, nested=nested)
    W = ref.dequantize_4bit(packed, absmax, code, bs, N * K, torch.float32, nq, nc, off)
    x = _randn(M * K, dtype, seed=seed + 1).view(M, K)
    b = _randn(N, torch.float32, seed=seed + 2) if bias else None
    want = x.double() @ W.view(N, K).double().t() + (b.double() if bias else 0.0)
    y = Guarded(M * N, dtype, fill=float("nan"))
    packed = placed(packed, packed_offset)
    emu.call("gemv_4bit", ptr(x), DTYPE_CODE[dtype], M, K, N, ptr(packed),
             None if nested else ptr(absmax), ptr(absmax) if nested else None, ptr(nq), ptr(nc),
             off, ptr(code), bs, ptr(b), ptr(y.tensor))
    assert_gemv_close(y.check().view(M, N), want, K)
    return emu.launches()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", (1, 2, 5, 16, 33))
def test_gemv_4bit_fast_and_general(emu, M, dtype):
    seen = set()
    for K, N, bs in ((64, 1, 64), (4096, 13, 64), (1024, 17, 128), (333, 9, 64), (100, 31, 32),
                     (2050, 3, 64)):
        for launch in _gemv(emu, M, K, N, dtype, bs, nested=False, seed=M * 1000 + K,
                            bias=K == 1024):
            seen.add(launch.split("<")[0])
    assert seen == {"gemv_4bit_fast_kernel", "gemv_4bit_general_kernel"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_4bit_double_quant_and_misaligned(emu, dtype):
    assert "fast" in _gemv(emu, 3, 1024, 40, dtype, 64, nested=True, seed=5)[0]
    assert "general" in _gemv(emu, 2, 777, 20, dtype, 64, nested=True, seed=6)[0]
    # packed not 16-byte aligned: the fast kernel's 16-byte loads are not allowed
    assert "general" in _gemv(emu, 4, 512, 20, dtype, 64, nested=False, seed=8,
                              packed_offset=4)[0]


@pytest.mark.parametrize("sm", (86, 89, 90))
@pytest.mark.parametrize("M,K", [(16, 4096), (4, 11008), (1, 28672)])
def test_gemv_4bit_shared_memory_limits(emu, sm, M, K):
    """Rows per tile and the fast/general choice follow the arch's opt-in shared memory: the
    emulation fails a launch beyond the function's attribute or the arch's limit."""
    emu.configure(sm, seed=K + sm)
    launches = _gemv(emu, M, K, 9, torch.bfloat16, 64, nested=True, seed=K)
    if sm == 90 and K == 28672:  # 126 KiB of x: only the opt-in limit of sm_90 holds it
        assert "fast" in launches[0] and int(launches[0].rsplit("smem=", 1)[1]) > 48 * 1024


# ------------------------------------------------------------------ AdamW
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
PTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cpu_kernel():
    if not qk.EXTENSION_LOADED:
        pytest.skip("the bit-exact AdamW oracle is the CPU kernel of qlora_kernels._C (not built)")
    return torch.ops.qlora_kernels


def _grads(n, dtype, seed):
    g = _randn(n, dtype, seed=seed)
    if n > 10:
        g[3] = float("inf")  # a NaN update from here on: p, m and v of element 3 stay NaN
    return g


@pytest.mark.parametrize("maximize", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw32(emu, dtype, maximize):
    ops = _cpu_kernel()
    for n in (1, 255, 70_001):
        p0 = _randn(n, dtype, seed=n)
        emu_state = [placed(p0), torch.zeros(n), torch.zeros(n)]
        cpu_state = [p0.clone(), torch.zeros(n), torch.zeros(n)]
        ref_state = [p0.clone(), torch.zeros(n), torch.zeros(n)]
        for step in range(1, 4):
            g = _grads(n, dtype, seed=n + step)
            p, m, v = emu_state
            emu.call("adamw32", PTYPE[dtype], ptr(p), ptr(g), ptr(m), ptr(v), n,
                     *HYPER.values(), step, int(maximize))
            ops.adamw_step_(cpu_state[0], g, *cpu_state[1:], *HYPER.values(), step, maximize)
            optim_ref.adamw_step_(ref_state[0], g, *ref_state[1:], *HYPER.values(), step,
                                  maximize)
        for got, want in zip(emu_state, cpu_state):
            assert_same_bits(got, want, (n, "vs the CPU kernel"))
        # the reference's torch CPU sqrt is not correctly rounded: p within an ulp or so of
        # itself or of the step
        assert_same_bits(emu_state[1], ref_state[1], "exp_avg")
        eps = torch.finfo(dtype).eps
        close = torch.isclose(emu_state[0].float(), ref_state[0].float(), equal_nan=True,
                              rtol=4 * eps, atol=4 * eps * HYPER["lr"])
        assert bool(close.all()), n


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw32_multi_tensor(emu, dtype):
    """Params spanning several launches (40 per launch), empty ones, and more than one CUDA
    block per param (16384 elements each): each equals the single-param kernel's result."""
    ops = _cpu_kernel()
    sizes = [1, 0, 16_385, 3] + [37 + i for i in range(44)] + [40_000]
    params = [_randn(n, dtype, seed=i) for i, n in enumerate(sizes)]
    grads = [_grads(n, dtype, seed=100 + i) for i, n in enumerate(sizes)]
    steps = [1 + i % 3 for i in range(len(sizes))]
    multi = [[p.clone(), torch.zeros(n), torch.zeros(n)] for p, n in zip(params, sizes)]
    single = [[p.clone(), torch.zeros(n), torch.zeros(n)] for p, n in zip(params, sizes)]

    def arr(ts):  # a C array of the tensors' addresses (the tensors stay alive in the lists)
        return (ce.ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])

    emu.call("adamw32_multi", PTYPE[dtype], len(sizes), arr([s[0] for s in multi]), arr(grads),
             arr([s[1] for s in multi]), arr([s[2] for s in multi]),
             (ce.ctypes.c_int64 * len(sizes))(*sizes), (ce.ctypes.c_int64 * len(sizes))(*steps),
             *HYPER.values(), 0)
    assert len(emu.launches()) == 2
    for (p, m, v), g, step, n in zip(single, grads, steps, sizes):
        ops.adamw_step_(p, g, m, v, *HYPER.values(), step, False)
    for a, b in zip(multi, single):
        for got, want in zip(a, b):
            assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw8bit(emu, dtype):
    ops = _cpu_kernel()
    code_m, code_v = dynamic_map(signed=True), dynamic_map(signed=False)
    for n in (1, 300, 256 * 40 + 7):
        nb = -(-n // 256)
        p0 = _randn(n, dtype, seed=n)
        states = [[placed(p0), torch.zeros(n, dtype=torch.uint8), torch.zeros(nb),
                   torch.zeros(n, dtype=torch.uint8), torch.zeros(nb)] for _ in range(2)]
        for step in range(1, 4):
            g = _grads(n, dtype, seed=n + step)
            p, qm, am, qv, av = states[0]
            emu.call("adamw8bit", PTYPE[dtype], ptr(p), ptr(g), ptr(qm), ptr(am), ptr(qv),
                     ptr(av), ptr(code_m), ptr(code_v), n, *HYPER.values(), step, 0)
            ops.adamw8bit_step_(states[1][0], g, *states[1][1:], code_m, code_v,
                                *HYPER.values(), step, False)
        for got, want in zip(*states):
            assert_same_bits(got, want, n)
        if n > 10:  # a non-finite gradient spoils only its own element: its param is NaN,
            # its moments are stored as 0 and no block's absmax is NaN
            p, _, absmax_m, _, absmax_v = states[0]
            assert bool(torch.isnan(p.float()).any())
            assert not bool(torch.isnan(absmax_m).any()) and not bool(torch.isnan(absmax_v).any())
