"""quantize_4bit / dequantize_4bit on every available backend against the reference."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.backends import available_backends
from qlora_kernels.backends import reference as ref

from conftest import DTYPES, ODD_SIZES

# backends under test on CPU tensors (triton: through the interpreter, in test_triton.py)
NATIVE = [b for b in available_backends("cpu") if b not in ("reference", "triton")]
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _rand(n, dtype, rng, scale=3.0):
    return (torch.randn(n, generator=rng) * scale).to(dtype)


@pytest.mark.skipif(not NATIVE, reason="compiled extension not built")
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(backend, qt, blocksize, dtype, rng):
    for n in ODD_SIZES + (blocksize * 3 + 2,):
        x = _rand(n, dtype, rng)
        with qk.use_backend(backend):
            p, a = torch.ops.qlora_kernels.quantize_4bit(x, blocksize, qt)
        p_ref, a_ref = ref.quantize_4bit(x, blocksize, qt)
        assert p.shape == ((n + 1) // 2, 1) and p.dtype == torch.uint8
        assert torch.equal(p, p_ref), f"packed differs (n={n})"
        assert torch.equal(a, a_ref)
        code = qk.get_4bit_code(qt)
        for out_dtype in DTYPES:
            with qk.use_backend(backend):
                got = torch.ops.qlora_kernels.dequantize_4bit(p, a, code, blocksize, n, out_dtype)
            want = ref.dequantize_4bit(p, a, code, blocksize, n, out_dtype)
            assert got.dtype == out_dtype and torch.equal(got, want), f"dequant differs (n={n})"


@pytest.mark.parametrize("backend", NATIVE + ["torch"])
@pytest.mark.parametrize("dq_code", ["fp8", "dynamic"])
def test_double_quant_fused_equals_unfused(backend, dq_code, rng):
    for n in (333 * 77, 64 * 256 * 3 + 5):
        x = _rand(n, torch.bfloat16, rng)
        p, s = qk.quantize_4bit(x, double_quant=True, dq_code=dq_code, backend=backend)
        assert s.nested and s.absmax.dtype == torch.uint8
        fused = qk.dequantize_4bit(p, s, backend=backend)
        absmax = qk.dequantize_absmax(s, backend="torch")
        unfused = ref.dequantize_4bit(p, absmax, s.code, s.blocksize, n, torch.bfloat16)
        assert torch.equal(fused.view(-1), unfused)
        out = torch.empty(n, dtype=torch.float32)
        qk.dequantize_4bit(p, s, out=out, backend=backend)
        assert torch.equal(out, ref.dequantize_4bit(p, absmax, s.code, s.blocksize, n, torch.float32))


def test_public_api_shapes_and_dtypes(rng):
    for dtype in DTYPES:
        w = _rand(333 * 77, dtype, rng).view(333, 77)
        packed, state = qk.quantize_4bit(w, double_quant=False)
        assert packed.shape == ((333 * 77 + 1) // 2, 1)
        w_hat = qk.dequantize_4bit(packed, state)
        assert w_hat.shape == w.shape and w_hat.dtype == dtype


def test_non_contiguous_input(rng):
    w = _rand(128 * 96, torch.float32, rng).view(128, 96)
    p1, s1 = qk.quantize_4bit(w.t(), double_quant=False)
    p2, s2 = qk.quantize_4bit(w.t().contiguous(), double_quant=False)
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
    assert s1.shape == (96, 128)


@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
def test_zero_blocks_give_exact_zeros(qt, rng):
    x = _rand(64 * 5, torch.float32, rng)
    x[64:192] = 0.0
    p, s = qk.quantize_4bit(x, quant_type=qt, double_quant=False)
    assert s.absmax[1].item() == 0.0 and s.absmax[2].item() == 0.0
    y = qk.dequantize_4bit(p, s)
    assert torch.isfinite(y).all()
    assert (y[64:192] == 0).all()
    assert torch.equal(qk.quantize_4bit(torch.zeros(100), double_quant=True)[0],
                       ref.quantize_4bit(torch.zeros(100), 64, "nf4")[0])


@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_a_fixed_point(qt, dtype, rng):
    x = _rand(333 * 77, dtype, rng)
    p, s = qk.quantize_4bit(x, quant_type=qt, double_quant=False)
    # the dequantized tensor, in float32, quantizes back to the same bytes
    y = qk.dequantize_4bit(p, s, dtype=torch.float32)
    p2, s2 = qk.quantize_4bit(y, quant_type=qt, double_quant=False)
    assert torch.equal(s.absmax, s2.absmax)
    if qt != "fp4":
        assert torch.equal(p, p2)
        return
    # FP4 has a signed zero: tiny negatives encode to -0 (pattern 8), which decodes to -0.0
    # and re-encodes as +0 (pattern 0, the sign bit is set only for x < 0). Nothing else moves.
    c1, c2 = ref.unpack_4bit(p, x.numel()), ref.unpack_4bit(p2, x.numel())
    assert ((c1 == c2) | ((c1 == 8) & (c2 == 0))).all()
    assert torch.equal(qk.dequantize_4bit(p2, s2), y)


def test_nf4_error_bounds():
    torch.manual_seed(1234)
    w = torch.randn(1024, 1024)
    p, s = qk.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=False)
    err = (qk.dequantize_4bit(p, s) - w).abs()
    mae = err.mean().item()
    nz = w != 0  # randn can hit an exact zero; relative error is undefined there
    rel = (err[nz] / w.abs()[nz]).mean().item()
    assert abs(mae - 0.0728) < 0.0015, mae
    assert abs(rel - 0.203) < 0.01, rel
    # double quantization adds no more than 1% to the mean absolute error
    for dq_code in ("fp8", "dynamic"):
        p2, s2 = qk.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True, dq_code=dq_code)
        mae2 = (qk.dequantize_4bit(p2, s2) - w).abs().mean().item()
        assert mae2 <= mae * 1.01, (dq_code, mae2, mae)


def test_nf4_beats_fp4_and_int4_on_normal_data():
    torch.manual_seed(7)
    w = torch.randn(512, 512)
    errs = {}
    for qt in ("nf4", "fp4", "int4"):
        p, s = qk.quantize_4bit(w, quant_type=qt, double_quant=False)
        errs[qt] = (qk.dequantize_4bit(p, s) - w).pow(2).mean().item()
    assert errs["nf4"] < errs["fp4"] and errs["nf4"] < errs["int4"], errs


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", NATIVE + ["torch"])
def test_bad_inputs(backend, rng):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        qk.quantize_4bit(torch.randint(0, 5, (64,)), backend=backend)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        qk.quantize_4bit(torch.ones(64, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="blocksize"):
        qk.quantize_4bit(torch.randn(64), blocksize=48, backend=backend)
    with pytest.raises(ValueError, match="blocksize"):
        qk.quantize_4bit(torch.randn(64), blocksize=8192, backend=backend)
    with pytest.raises(ValueError, match="quant_type"):
        qk.quantize_4bit(torch.randn(64), quant_type="nf3", backend=backend)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = _rand(64 * 10, torch.float32, rng)
        x[64 * 7 + 3] = bad
        with pytest.raises(ValueError, match="first bad block is 7"):
            qk.quantize_4bit(x, backend=backend)
    x = _rand(64 * 10, torch.bfloat16, rng)
    x[5] = float("nan")
    with pytest.raises(ValueError, match="block is 0"):
        qk.quantize_4bit(x, backend=backend)


def test_mismatched_packed_and_state(rng):
    p1, s1 = qk.quantize_4bit(_rand(128 * 64, torch.float32, rng).view(128, 64))
    p2, s2 = qk.quantize_4bit(_rand(64 * 64, torch.float32, rng).view(64, 64))
    with pytest.raises(ValueError, match="packed weight holds"):
        qk.dequantize_4bit(p1, s2)
    with pytest.raises(ValueError, match="uint8"):
        qk.dequantize_4bit(p1.float(), s1)
    with pytest.raises(TypeError, match="QuantState"):
        qk.dequantize_4bit(p1, {"absmax": s1.absmax})
    with pytest.raises(ValueError, match="out must be"):
        qk.dequantize_4bit(p1, s1, out=torch.empty(10))


@pytest.mark.skipif(not NATIVE, reason="compiled extension not built")
def test_op_level_checks_name_the_problem():
    p, a = torch.ops.qlora_kernels.quantize_4bit(torch.randn(100), 64, "nf4")
    code = qk.get_4bit_code("nf4")
    with pytest.raises(RuntimeError, match="packed holds"):
        torch.ops.qlora_kernels.dequantize_4bit(p, a, code, 64, 300, torch.float32)
    with pytest.raises(RuntimeError, match="absmax has"):
        torch.ops.qlora_kernels.dequantize_4bit(p, a[:1], code, 64, 100, torch.float32)
    with pytest.raises(RuntimeError, match="code must be"):
        torch.ops.qlora_kernels.dequantize_4bit(p, a, code[:8], 64, 100, torch.float32)
    with pytest.raises(RuntimeError, match="uint8 absmax needs"):
        torch.ops.qlora_kernels.dequantize_4bit(p, a.to(torch.uint8), code, 64, 100, torch.float32)
    with pytest.raises(RuntimeError, match="quant_type"):
        torch.ops.qlora_kernels.quantize_4bit(torch.randn(100), 64, "nf5")


@pytest.mark.skipif(not NATIVE, reason="compiled extension not built")
def test_opcheck(rng):
    x = _rand(333, torch.bfloat16, rng)
    torch.library.opcheck(torch.ops.qlora_kernels.quantize_4bit.default, (x, 64, "nf4"))
    p, a = torch.ops.qlora_kernels.quantize_4bit(x, 64, "nf4")
    code = qk.get_4bit_code("nf4")
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_4bit.default,
                          (p, a, code, 64, 333, torch.bfloat16))
    q8, s8 = torch.ops.qlora_kernels.quantize_8bit(a - a.mean(), qk.fp8_e4m3_map(), 256)
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_4bit.default,
                          (p, q8, code, 64, 333, torch.float16, s8, qk.fp8_e4m3_map(), 0.5))
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_4bit_out.default,
                          (p, a, code, 64, None, None, 0.0, torch.empty(333)))
    torch.library.opcheck(torch.ops.qlora_kernels.quantize_8bit.default, (x, qk.dynamic_map(), 256))
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_8bit.default,
                          (q8, s8, qk.fp8_e4m3_map(), 256, torch.float32))


def _edge_values(code: torch.Tensor, rng) -> torch.Tensor:
    """Every code value and midpoint with its float neighbours, signed zeros, subnormals and
    random values, in blocks of 256 that each hold 1.0 (absmax 1: the scaled value is the
    value itself), then one block with NaN and one with inf."""
    mids = (code[:-1] + code[1:]) * 0.5
    pts = torch.cat([code, mids])
    vals = torch.cat([pts, torch.nextafter(pts, torch.tensor(2.0)),
                      torch.nextafter(pts, torch.tensor(-2.0)),
                      torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, 1.0, -1.0]),
                      torch.rand(3000, generator=rng) * 2 - 1])
    vals = vals.clamp(-1.0, 1.0)
    if code.min() >= 0:
        vals = vals.abs()
    blocks = [torch.cat([torch.ones(1), chunk]) for chunk in vals.split(255)]
    blocks[-1] = torch.cat([blocks[-1], torch.zeros(256 - blocks[-1].numel())])
    special = torch.rand(256, generator=rng)
    nan_block, inf_block = special.clone(), special.clone()
    nan_block[7], inf_block[9] = float("nan"), float("inf")
    return torch.cat(blocks + [nan_block, inf_block])


@pytest.mark.skipif(not NATIVE, reason="compiled extension not built")
@pytest.mark.parametrize("code_name", ["dynamic_signed", "dynamic_unsigned", "fp8_e4m3",
                                       "crowded"])
def test_8bit_encoder_edge_values_match_reference(code_name, rng):
    # the CPU encoder's bucket table (csrc/cpu/encode8_cpu.h) against torch.bucketize at
    # every midpoint, its neighbours and the specials; "crowded" has midpoints too close
    # for the table (several per bucket), so it takes the binary search
    code = {"dynamic_signed": qk.dynamic_map(True), "dynamic_unsigned": qk.dynamic_map(False),
            "fp8_e4m3": qk.fp8_e4m3_map(),
            "crowded": torch.linspace(0.999, 1.0, 256)}[code_name]
    x = _edge_values(code, rng)
    for n in (x.numel(), x.numel() - 3):  # and a tail that is not a multiple of 8
        q, a = torch.ops.qlora_kernels.quantize_8bit(x[:n], code, 256)
        q_ref, a_ref = ref.quantize_8bit(x[:n], code, 256)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=0, equal_nan=True)
        bad = (q != q_ref).nonzero()
        assert bad.numel() == 0, f"{bad.numel()} codes differ, first at {x[bad[0]].item()!r}"


@pytest.mark.skipif(not NATIVE, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_blockwise_8bit_matches_reference(dtype, rng):
    for code in (qk.dynamic_map(True), qk.dynamic_map(False), qk.fp8_e4m3_map()):
        for n in ODD_SIZES:
            x = _rand(n, dtype, rng)
            if code.min() >= 0:
                x = x.abs()
            q, a = torch.ops.qlora_kernels.quantize_8bit(x, code, 256)
            q_ref, a_ref = ref.quantize_8bit(x, code, 256)
            assert torch.equal(q, q_ref) and torch.equal(a, a_ref)
            assert torch.equal(torch.ops.qlora_kernels.dequantize_8bit(q, a, code, 256, dtype),
                               ref.dequantize_8bit(q, a, code, 256, dtype))
