"""The CUDA kernels (csrc/cuda) against the PyTorch reference, on a GPU.

Quantize and dequantize must be bit-exact (torch.equal) with the reference run on CPU;
gemv_4bit is compared with a float32 matmul of the reference-dequantized weight. Every test
is marked ``gpu`` and skips without a CUDA device; on a GPU machine whose build lacks the
CUDA kernels the tests fail (they would otherwise silently test a fallback).
"""
from __future__ import annotations

import re

import pytest
import torch

import qlora_kernels  # noqa: F401  (registers the ops)
from qlora_kernels import _extension
from qlora_kernels.backends import reference as ref
from qlora_kernels.formats import dynamic_map, fp8_e4m3_map, get_4bit_code

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 63, 65, 333 * 77)
QUANT_TYPES = ("nf4", "fp4", "int4")
OPS = torch.ops.qlora_kernels


@pytest.fixture(autouse=True)
def cuda_kernels():
    dump = torch._C._dispatch_dump("qlora_kernels::quantize_4bit")
    if not (_extension.EXTENSION_LOADED and re.search(r"CUDA: registered at .*quantize_binding", dump)):
        pytest.fail("qlora_kernels._C was built without its CUDA kernels (csrc/cuda); rebuild "
                    "with torch+CUDA and nvcc available")


def _randn(n, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values at an address that is not 16-byte aligned (forces the scalar paths)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


# ------------------------------------------------------------------ quantize_4bit
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_bit_exact(n, quant_type, dtype):
    x = _randn(n, dtype, seed=n)
    for bs in (32, 64, 256):
        p_ref, a_ref = ref.quantize_4bit(x, bs, quant_type)
        p, a = OPS.quantize_4bit(x.cuda(), bs, quant_type)
        assert torch.equal(a.cpu(), a_ref), (bs, (a.cpu() - a_ref).abs().max())
        assert torch.equal(p.cpu(), p_ref), bs


@pytest.mark.parametrize("blocksize", (32, 64, 128, 256, 512, 1024, 2048, 4096))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_every_blocksize(blocksize, dtype):
    for n in (blocksize * 3 + 7, 2 * blocksize - 1, 100_001):
        x = _randn(n, dtype, seed=blocksize + n, scale=3.0)
        p_ref, a_ref = ref.quantize_4bit(x, blocksize, "nf4")
        p, a = OPS.quantize_4bit(x.cuda(), blocksize, "nf4")
        assert torch.equal(a.cpu(), a_ref) and torch.equal(p.cpu(), p_ref), n
        # unaligned input takes the scalar load path: same result
        p2, a2 = OPS.quantize_4bit(_unaligned(x.cuda()), blocksize, "nf4")
        assert torch.equal(a2, a) and torch.equal(p2, p), n


def test_quantize_4bit_nan_and_inf_blocks():
    x = _randn(64 * 5 + 3, torch.float32, seed=7)
    x[70] = float("nan")   # block 1
    x[200] = float("inf")  # block 3
    x[322] = float("nan")  # last, partial block
    _, a = OPS.quantize_4bit(x.cuda(), 64, "nf4")
    a = a.cpu()
    assert torch.isnan(a[1]) and torch.isnan(a[5]) and a[3] == float("inf")
    _, a_ref = ref.quantize_4bit(x, 64, "nf4")
    for b in (0, 2, 4):
        assert a[b] == a_ref[b]


def test_quantize_4bit_noncontiguous_and_empty():
    x = _randn(64 * 40, torch.bfloat16, seed=3).view(40, 64)
    p_ref, a_ref = ref.quantize_4bit(x.t().contiguous(), 64, "fp4")
    p, a = OPS.quantize_4bit(x.cuda().t(), 64, "fp4")
    assert torch.equal(p.cpu(), p_ref) and torch.equal(a.cpu(), a_ref)
    p, a = OPS.quantize_4bit(torch.empty(0, device="cuda"), 64, "nf4")
    assert p.shape == (0, 1) and a.shape == (0,)


# ------------------------------------------------------------------ dequantize_4bit
def _quantized(n, blocksize, quant_type, seed, nested=False, dq_code="fp8"):
    x = _randn(n, torch.float32, seed=seed, scale=2.0)
    packed, absmax = ref.quantize_4bit(x, blocksize, quant_type)
    code = get_4bit_code(quant_type)
    if not nested:
        return packed, absmax, code, None, None, 0.0
    offset = float(absmax.mean())
    c8 = fp8_e4m3_map() if dq_code == "fp8" else dynamic_map(True)
    q8, scale2 = ref.quantize_8bit(absmax - offset, c8, 256)
    return packed, q8, code, scale2, c8, offset


def _cuda(*ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("n", SIZES + (64 * 300 + 5,))
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_4bit_bit_exact(n, out_dtype, nested):
    for bs, qt in ((64, "nf4"), (32, "fp4"), (4096, "int4"), (128, "nf4")):
        packed, absmax, code, na, nc, off = _quantized(n, bs, qt, seed=n + bs, nested=nested)
        want = ref.dequantize_4bit(packed, absmax, code, bs, n, out_dtype, na, nc, off)
        got = OPS.dequantize_4bit(*_cuda(packed, absmax, code), bs, n, out_dtype,
                                  *_cuda(na, nc), off)
        assert got.dtype == out_dtype and got.shape == (n,)
        assert torch.equal(got.cpu(), want), (bs, qt)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_4bit_out_aligned_and_unaligned(out_dtype):
    n = 333 * 77
    packed, absmax, code, na, nc, off = _quantized(n, 64, "nf4", seed=11, nested=True,
                                                   dq_code="dynamic")
    want = ref.dequantize_4bit(packed, absmax, code, 64, n, out_dtype, na, nc, off)
    args = _cuda(packed, absmax, code)
    for out in (torch.empty(n, dtype=out_dtype, device="cuda"),
                _unaligned(torch.zeros(n, dtype=out_dtype, device="cuda"))):
        OPS.dequantize_4bit_out(*args, 64, *_cuda(na, nc), off, out)
        assert torch.equal(out.cpu(), want)
    # unaligned packed bytes: scalar path, same values
    got = OPS.dequantize_4bit(_unaligned(args[0]), args[1], args[2], 64, n, out_dtype,
                              *_cuda(na, nc), off)
    assert torch.equal(got.cpu(), want)


def test_dequantize_4bit_rejects_bad_input():
    packed, absmax, code, *_ = _quantized(100, 64, "nf4", seed=1)
    with pytest.raises(RuntimeError, match="code"):
        OPS.dequantize_4bit(packed.cuda(), absmax.cuda(), code, 64, 100, torch.float16)
    with pytest.raises(RuntimeError, match="absmax"):
        OPS.dequantize_4bit(packed.cuda(), absmax[:1].cuda(), code.cuda(), 64, 100, torch.float16)
    with pytest.raises(RuntimeError, match="blocksize"):
        OPS.dequantize_4bit(packed.cuda(), absmax.cuda(), code.cuda(), 48, 100, torch.float16)


# ------------------------------------------------------------------ 8-bit
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_8bit_bit_exact(n, dtype):
    x = _randn(n, dtype, seed=n + 5, scale=4.0)
    for code in (dynamic_map(True), fp8_e4m3_map()):
        for bs in (256, 64, 100, 1, 4096):
            q_ref, a_ref = ref.quantize_8bit(x, code, bs)
            q, a = OPS.quantize_8bit(x.cuda(), code.cuda(), bs)
            assert torch.equal(a.cpu(), a_ref) and torch.equal(q.cpu(), q_ref), bs
            for out_dtype in DTYPES:
                want = ref.dequantize_8bit(q_ref, a_ref, code, bs, out_dtype)
                got = OPS.dequantize_8bit(q, a, code.cuda(), bs, out_dtype)
                assert torch.equal(got.cpu(), want), (bs, out_dtype)
                got = OPS.dequantize_8bit(_unaligned(q), a, code.cuda(), bs, out_dtype)
                assert torch.equal(got.cpu(), want), (bs, out_dtype, "unaligned")


def test_quantize_8bit_nan_block():
    x = _randn(1000, torch.float32, seed=2)
    x[300] = float("nan")
    _, a = OPS.quantize_8bit(x.cuda(), dynamic_map(True).cuda(), 256)
    assert torch.isnan(a[1]).item() and not torch.isnan(a[[0, 2, 3]]).any().item()


# ------------------------------------------------------------------ gemv_4bit
GEMV_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_gemv_close(y: torch.Tensor, want: torch.Tensor, K: int) -> None:
    """y (x.dtype) against the float64 product `want`, within GEMV_TOL scaled by sqrt(K)."""
    err = (y.cpu().double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    assert err <= GEMV_TOL[y.dtype] * scale * max(1.0, (K / 256) ** 0.5), (y.shape, K, err, scale)


def _check_gemv(M, K, N, dtype, bs, nested, seed, packed_unaligned=False):
    packed, absmax, code, na, nc, off = _quantized(N * K, bs, "nf4", seed=seed, nested=nested)
    W = ref.dequantize_4bit(packed, absmax, code, bs, N * K, torch.float32, na, nc, off)
    x = _randn(M * K, dtype, seed=seed + 1).view(M, K)
    want = x.double() @ W.view(N, K).double().t()
    p = packed.cuda()
    if packed_unaligned:
        p = _unaligned(p)
    y = OPS.gemv_4bit(x.cuda(), p, *_cuda(absmax, code), bs, N, *_cuda(na, nc), off)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_gemv_close(y, want, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", (1, 2, 5, 16, 33))
@pytest.mark.parametrize("K,N,bs", [(64, 1, 64), (4096, 77, 64), (1024, 256, 128),
                                    (333, 65, 64), (100, 31, 32), (2050, 3, 64)])
def test_gemv_4bit_matches_float32_reference(M, K, N, bs, dtype):
    _check_gemv(M, K, N, dtype, bs, nested=False, seed=M * 1000 + K)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_4bit_double_quant_and_unaligned(dtype):
    _check_gemv(3, 1024, 600, dtype, 64, nested=True, seed=5)    # fast path, nested decode
    _check_gemv(2, 777, 50, dtype, 64, nested=True, seed=6)      # general path, nested decode
    _check_gemv(4, 512, 40, dtype, 64, nested=False, seed=8, packed_unaligned=True)


# 28,672 (LLaMA-70B down_proj) and 53,248 do not fit sm_86/89's shared memory even with one
# row, and 53,248 x 16 rows not H100/H200's: x is staged in passes (csrc/cuda/gemv_plan.h).
@pytest.mark.parametrize("M,K", [(1, 14336), (16, 4096), (4, 11008), (16, 28672), (3, 53248),
                                 (16, 53248)])
def test_gemv_4bit_large_k_shared_memory_tiling(M, K):
    _check_gemv(M, K, 24, torch.bfloat16, 64, nested=True, seed=K)


def test_gemv_4bit_more_row_tiles_than_grid_y_allows():
    # 65,535 CTAs along y of 16 rows each, and 3 rows more: the grid strides over row tiles
    for K, bs in ((64, 64), (40, 32)):  # fast and general kernel
        _check_gemv(65535 * 16 + 3, K, 3, torch.float16, bs, nested=False, seed=K)


def test_gemv_4bit_rejects_bad_input():
    packed, absmax, code, *_ = _quantized(64 * 10, 64, "nf4", seed=1)
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(RuntimeError, match="packed"):
        OPS.gemv_4bit(x, packed.cuda(), absmax.cuda(), code.cuda(), 64, 11)
    with pytest.raises(RuntimeError, match="2-D"):
        OPS.gemv_4bit(x[0], packed.cuda(), absmax.cuda(), code.cuda(), 64, 10)
    with pytest.raises(RuntimeError, match="CUDA"):
        OPS.gemv_4bit(x, packed, absmax.cuda(), code.cuda(), 64, 10)
