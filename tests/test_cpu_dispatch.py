"""Run-time CPU dispatch: every path this CPU has (forced with set_cpu_isa) gives the
reference's bits for dequantize (and the column tiles of the backward), 4-bit and 8-bit
quantize and seeded dropout, and the scalar path's bits for the 32-bit and 8-bit AdamW steps; the
override refuses unknown paths and paths the CPU lacks; the env variable works at import."""
import os
import subprocess
import sys

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _extension, cpu_dispatch
from qlora_kernels.backends import reference
from qlora_kernels.formats import SUPPORTED_BLOCKSIZES, dynamic_map, get_dq_code

needs_ext = pytest.mark.skipif(not _extension.EXTENSION_LOADED, reason="compiled extension not built")
BEST = cpu_dispatch.cpu_isa()
PATHS = cpu_dispatch.ISA_NAMES[: cpu_dispatch.ISA_NAMES.index(BEST) + 1]


@pytest.fixture(params=PATHS)
def isa(request):
    cpu_dispatch.set_cpu_isa(request.param)
    yield request.param
    cpu_dispatch.set_cpu_isa(None)


def _quantized(n, rng, quant_type, double_quant, blocksize=64):
    w = torch.randn(n, generator=rng) * 3
    w[n // 2] = 0.0  # a zero inside a block
    packed, state = qk.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                     double_quant=double_quant)
    s2 = state.state2
    return (packed, state.absmax, state.code, blocksize, None if s2 is None else s2.absmax,
            None if s2 is None else s2.code, float(state.offset or 0.0))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 63, 65, 333 * 77, 64 * 300])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int4", True)])
def test_dequantize_every_path_gives_reference_bits(isa, dtype, n, quant_type, double_quant, rng):
    packed, absmax, code, bs, na, nc, off = _quantized(n, rng, quant_type, double_quant)
    got = torch.ops.qlora_kernels.dequantize_4bit(packed, absmax, code, bs, n, dtype, na, nc, off)
    want = reference.dequantize_4bit(packed, absmax, code, bs, n, dtype, na, nc, off)
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,row_len,col0,cols", [(77, 256, 64, 128), (5, 128, 0, 128),
                                                    (300, 64 * 9, 64 * 8, 64)])
def test_dequantize_column_tiles(isa, dtype, rows, row_len, col0, cols, rng):
    packed, absmax, code, bs, na, nc, off = _quantized(rows * row_len, rng, "nf4", True)
    out = torch.empty(rows, cols, dtype=dtype)
    torch.ops.qlora_kernels.dequantize_4bit_cols_out(packed, absmax, code, bs, na, nc, off,
                                                     row_len, col0, out)
    full = reference.dequantize_4bit(packed, absmax, code, bs, rows * row_len, dtype, na, nc, off)
    assert torch.equal(out, full.view(rows, row_len)[:, col0:col0 + cols])


@needs_ext
def test_dequantize_column_tiles_checks(rng):
    packed, absmax, code, bs, na, nc, off = _quantized(4 * 256, rng, "nf4", False)
    with pytest.raises(RuntimeError, match="multiples of blocksize"):
        torch.ops.qlora_kernels.dequantize_4bit_cols_out(packed, absmax, code, bs, na, nc, off,
                                                         256, 32, torch.empty(4, 64))
    with pytest.raises(RuntimeError, match="not inside a row"):
        torch.ops.qlora_kernels.dequantize_4bit_cols_out(packed, absmax, code, bs, na, nc, off,
                                                         256, 192, torch.empty(4, 128))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quantize_every_path_gives_the_same_bits(isa, dtype, quant_type, rng):
    for blocksize in SUPPORTED_BLOCKSIZES:
        # odd sizes: partial last blocks, tails shorter than one SIMD step, an odd numel
        for n in (1, 31, blocksize + 17, 3 * blocksize + 33, 333 * 77):
            x = (torch.randn(n, generator=rng) * 2).to(dtype)
            if n > blocksize:
                x[:blocksize] = 0.0  # an all-zero block
                x[blocksize + 1] = float("nan")  # a NaN block: absmax NaN, the rest as the reference
            got = torch.ops.qlora_kernels.quantize_4bit(x, blocksize, quant_type)
            want = reference.quantize_4bit(x, blocksize, quant_type)
            where = f"{isa} {dtype} {quant_type} blocksize {blocksize} n {n}"
            assert torch.equal(got[0], want[0]), where
            assert torch.allclose(got[1], want[1], rtol=0, atol=0, equal_nan=True), where


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize,k", [(64, 320), (128, 384), (32, 96), (64, 333)])
def test_gemv_every_path_close_to_reference(isa, dtype, blocksize, k, rng):
    # every row tile (4, 2, 1 rows), blocksizes the 512-bit paths take (multiples of 64) and
    # those that fall back (32; K not a multiple of the blocksize: scalar); heavy-tailed x
    # (groups spanning several binades, for the bf16 fixed-point path) and a bias
    n = 37
    packed, state = qk.quantize_4bit(torch.randn(n, k, generator=rng), blocksize=blocksize)
    s2 = state.state2
    args = (packed, state.absmax, state.code, blocksize, n, s2.absmax, s2.code,
            float(state.offset))
    for m in (1, 2, 3, 4, 7):
        x = (torch.randn(m, k, generator=rng) * torch.rand(m, k, generator=rng) ** 4 * 30).to(dtype)
        b = torch.randn(n, generator=rng)
        got = torch.ops.qlora_kernels.gemv_4bit(x, *args, b)
        want = reference.gemv_4bit(x.float(), *args, b)
        assert got.dtype == dtype
        # one rounding of the output to x's dtype, plus float32 summation-order error
        ulp = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -8}
        bound = want.abs() * ulp[dtype] + want.abs().max() * (1e-3 if dtype == torch.bfloat16
                                                              else 1e-5)
        assert ((got.float() - want).abs() <= bound).all(), (got.float() - want).abs().max()


def test_override_refuses_unknown_and_missing_paths():
    with pytest.raises(ValueError, match="unknown CPU path"):
        cpu_dispatch.set_cpu_isa("avx1024")
    for isa in cpu_dispatch.ISA_NAMES[len(PATHS):]:  # paths this CPU lacks, if any
        with pytest.raises(ValueError, match="lacks"):
            cpu_dispatch.set_cpu_isa(isa)
    assert cpu_dispatch.cpu_isa() == BEST


@needs_ext
@pytest.mark.parametrize("isa", PATHS)
def test_env_override_and_info(isa):
    env = dict(os.environ, QLORA_KERNELS_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-m", "qlora_kernels", "info"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"cpu path in force: {isa}" in out.stdout
    assert "GEMV up to this many rows" in out.stdout


def test_auto_compute_dtype_follows_native_bf16():
    want = torch.bfloat16 if "avx512_bf16" in cpu_dispatch.cpu_features() and BEST == "avx512_bf16" \
        else torch.float32
    from qlora_kernels.compute_dtype import resolve_compute_dtype
    assert resolve_compute_dtype("auto", "cpu") == want
    assert resolve_compute_dtype("auto", "cuda") == torch.bfloat16


@needs_ext
@pytest.mark.parametrize("n", [1, 15, 17, 40, 333 * 77])
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, True)])
def test_adamw_every_path_gives_the_same_bits(n, weight_decay, maximize, rng):
    # float32 params: scalar, AVX2 (8 lanes) and AVX-512 (16 lanes, scalar tails) do the
    # same IEEE operations per element, so every path must give the scalar path's bits
    p0 = torch.randn(n, generator=rng)
    grads = [torch.randn(n, generator=rng) for _ in range(3)]
    results = {}
    for path in PATHS:
        cpu_dispatch.set_cpu_isa(path)
        try:
            p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
            for step, g in enumerate(grads, 1):
                torch.ops.qlora_kernels.adamw_step_(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8,
                                                    weight_decay, step, maximize)
            results[path] = (p, m, v)
        finally:
            cpu_dispatch.set_cpu_isa(None)
    want = results["scalar"]
    assert not torch.equal(want[0], p0)
    for path, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, want)), path


@needs_ext
@pytest.mark.parametrize("code_name", ["dynamic", "dynamic_unsigned", "fp8"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_8bit_every_path_gives_reference_bits(isa, code_name, blocksize, rng):
    # the encoder's 8 (AVX2) and 16 (AVX-512) lane loops and their scalar tails: sizes below,
    # between and past one step of each, partial blocks; NaN, infinities, -0.0, a zero block
    code = {"dynamic": dynamic_map(signed=True), "dynamic_unsigned": dynamic_map(signed=False),
            "fp8": get_dq_code("fp8")}[code_name]
    for n in (1, 7, 9, 15, 17, 31, 33, blocksize + 23, 3 * blocksize + 5, 333 * 77):
        x = torch.randn(n, generator=rng) * 3
        if code_name == "dynamic_unsigned":
            x = x.abs()
        if n > 40:
            x[3], x[11], x[20] = float("nan"), float("inf"), -0.0
            x[-1] = -float("inf")
        if n > 2 * blocksize:
            x[blocksize: 2 * blocksize] = 0.0
        got_q, got_absmax = torch.ops.qlora_kernels.quantize_8bit(x, code, blocksize)
        want_q, want_absmax = reference.quantize_8bit(x, code, blocksize)
        where = f"{isa} {code_name} blocksize {blocksize} n {n}"
        assert torch.equal(got_q, want_q), where
        assert torch.allclose(got_absmax, want_absmax, rtol=0, atol=0, equal_nan=True), where


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 255, 256 * 3 + 17, 333 * 77])
def test_adamw8bit_every_path_gives_the_same_bits(dtype, n, rng):
    # the moments re-encoded 8 or 16 lanes at a time (and float32 params updated so) on each
    # path: every path must give the scalar path's bits, a NaN gradient element included
    p0 = torch.randn(n, generator=rng).to(dtype)
    grads = [torch.randn(n, generator=rng).to(dtype) for _ in range(3)]
    grads[1][n // 2] = float("nan")
    code_m, code_v = dynamic_map(signed=True), dynamic_map(signed=False)
    nblocks = (n + 255) // 256
    results = {}
    for path in PATHS:
        cpu_dispatch.set_cpu_isa(path)
        try:
            p = p0.clone()
            state = (torch.zeros(n, dtype=torch.uint8), torch.zeros(nblocks),
                     torch.zeros(n, dtype=torch.uint8), torch.zeros(nblocks))
            for step, g in enumerate(grads, 1):
                torch.ops.qlora_kernels.adamw8bit_step_(p, g, *state, code_m, code_v, 1e-2, 0.9,
                                                        0.999, 1e-8, 0.01, step, False)
            results[path] = (p, *state)
        finally:
            cpu_dispatch.set_cpu_isa(None)
    want = results["scalar"]
    assert not torch.equal(want[0][:1], p0[:1])
    for path, got in results.items():
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(got, want)), path


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 1531), (70_001,)])
@pytest.mark.parametrize("seed,p", [(0, 0.05), (-7, 0.5), ((1 << 62) + 3, 0.9), (12345, 0.0)])
def test_dropout_seeded_every_path_gives_reference_bits(isa, dtype, shape, seed, p, rng):
    # 70_001 elements: two parallel chunks and a partial one; NaN and Inf kept or dropped
    x = (torch.randn(shape, generator=rng) * 4).to(dtype)
    flat = x.view(-1)
    flat[: min(5, flat.numel())] = float("nan")
    flat[-3:] = float("inf")
    got = torch.ops.qlora_kernels.dropout_seeded(x, seed, p)
    want = reference.dropout_seeded(x, seed, p)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
