"""Triton backend against the PyTorch reference (qlora_kernels.backends.reference).

Quantize / dequantize (4-bit, fused double-quant decode, 8-bit) must be bit-exact
(torch.equal); the 4-bit GEMM is compared with float32 ``x @ dequantize(W).T``. Without a
GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), so sizes are kept small enough for a 2-core CI machine.
"""
import pytest
import torch

pytest.importorskip("triton")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels.backends import reference as ref  # noqa: E402
import qlora_kernels.triton as tb  # noqa: E402
from qlora_kernels.formats import (dynamic_map, encode_thresholds, fp8_e4m3_map,  # noqa: E402
                                   get_4bit_code)

from conftest import DTYPES, HAS_CUDA, ODD_SIZES  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
# Inf * (1 / Inf -> 0) is NaN on purpose in the special-value tests; numpy (the
# interpreter) warns about it
IGNORE_INF_TIMES_ZERO = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
QUANT_TYPES = ("nf4", "fp4", "int4")


def _data(n, dtype, rng, blocksize=64):
    """Fresh random values whose magnitude varies from block to block."""
    x = torch.randn(n, generator=rng)
    scale = torch.exp(2 * torch.randn(-(-n // blocksize), generator=rng))
    x = x * scale.repeat_interleave(blocksize)[:n]
    return x.to(dtype).to(DEV)


def _assert_quant_equal(x, blocksize, quant_type):
    p, a = tb.quantize_4bit(x, blocksize, quant_type)
    p_ref, a_ref = ref.quantize_4bit(x, blocksize, quant_type)
    assert p.shape == p_ref.shape and p.dtype == torch.uint8
    # exact, NaN where the reference has NaN (torch.equal treats NaN as unequal)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=0, equal_nan=True)
    _assert_codes_equal(ref.unpack_4bit(p, x.numel()), ref.unpack_4bit(p_ref, x.numel()), x)
    return p, a


def _assert_codes_equal(codes, codes_ref, x):
    """Codes equal the reference's, except where x is NaN or +-Inf (s = NaN there): the
    kernels follow csrc/include/qk_format.h (NaN compares false with every threshold ->
    code 0, as the C++ kernels do), while the reference's torch.bucketize puts NaN last.
    Such blocks have a non-finite absmax and the public API raises on them anyway."""
    bad = ~torch.isfinite(x.reshape(-1).float())
    assert torch.equal(codes[~bad], codes_ref[~bad]), "codes differ"
    assert (codes[bad] == 0).all(), "a NaN scaled value must encode to 0 (qk_format.h)"


# --- 4-bit quantize / dequantize --------------------------------------------------------
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_dequantize_4bit_bitexact(quant_type, blocksize, rng):
    code = get_4bit_code(quant_type, DEV)
    for dtype in DTYPES:
        for n in ODD_SIZES:
            x = _data(n, dtype, rng, blocksize)
            p, a = _assert_quant_equal(x, blocksize, quant_type)
            got = tb.dequantize_4bit(p, a, code, blocksize, n, dtype)
            assert got.dtype == dtype and got.shape == (n,)
            assert torch.equal(got, ref.dequantize_4bit(p, a, code, blocksize, n, dtype))


def test_blocksize_4096_partial_last_block(rng):
    n = 333 * 77  # 6 full blocks and a partial one
    x = _data(n, torch.bfloat16, rng, 4096)
    p, a = _assert_quant_equal(x, 4096, "nf4")
    assert a.numel() == 7
    code = get_4bit_code("nf4", DEV)
    assert torch.equal(tb.dequantize_4bit(p, a, code, 4096, n, torch.float32),
                       ref.dequantize_4bit(p, a, code, 4096, n, torch.float32))


def test_odd_numel_pads_low_nibble_with_zero(rng):
    for qt in QUANT_TYPES:
        x = _data(65, torch.float32, rng)
        x[-1] = 0.0  # encodes to a non-zero index for nf4 / int4: padding must not
        p, _ = _assert_quant_equal(x, 32, qt)
        assert p[-1, 0].item() & 0xF == 0


@IGNORE_INF_TIMES_ZERO
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_block_ties_nan_inf(quant_type, rng):
    bs = 32
    x = _data(6 * bs, torch.float32, rng, bs)
    x[:bs] = 0.0                                       # block 0: all zero
    thr = encode_thresholds(quant_type).to(DEV)
    thr = thr[thr.abs() <= 1]  # int4's outermost midpoint lies beyond absmax 1
    x[bs:bs + thr.numel()] = thr                      # block 1: values exactly on the
    x[bs + thr.numel():2 * bs] = 0.5                  # midpoints (absmax 1: s == x), so the
    x[2 * bs - 1] = 1.0                               # lower index must win
    x[2 * bs] = -thr[3]
    x[2 * bs + 1] = -1.0                              # block 2: negated ties (fp4 sign)
    x[3 * bs + 5] = float("nan")                      # block 3: NaN
    x[4 * bs + 7] = float("inf")                      # block 4: Inf
    x[5 * bs + 1] = float("-inf")                     # block 5: -Inf
    p, a = _assert_quant_equal(x, bs, quant_type)
    assert a[0].item() == 0.0 and a[1].item() == 1.0
    assert torch.isnan(a[3]) and a[4].item() == float("inf") and a[5].item() == float("inf")
    codes = ref.unpack_4bit(p, x.numel())
    assert torch.equal(codes[bs:bs + thr.numel()], ref.encode_4bit(thr, quant_type))
    # the same with half inputs (NaN / Inf survive the cast)
    for dtype in (torch.float16, torch.bfloat16):
        _assert_quant_equal(x.to(dtype), bs, quant_type)


def test_nan_in_every_position_of_a_tile(rng):
    # the NaN flag is separate from the max: check it in even and odd lanes, first and last
    x = _data(128, torch.float32, rng, 64)
    for i in (0, 1, 62, 63, 127):
        y = x.clone()
        y[i] = float("nan")
        _, a = tb.quantize_4bit(y, 64, "nf4")
        assert torch.isnan(a[i // 64]) and not torch.isnan(a[1 - i // 64])


@pytest.mark.parametrize("dq_code", ["fp8", "dynamic"])
def test_fused_double_quant_decode_bitexact(dq_code, rng):
    n, bs = 333 * 77, 32  # 802 blocks -> 4 nested blocks of 256 (the last partial)
    x = _data(n, torch.float32, rng, bs)
    packed, st = qk.quantize_4bit(x, bs, "nf4", double_quant=True, dq_code=dq_code,
                                  backend="torch")
    assert st.absmax.dtype == torch.uint8 and st.state2.absmax.numel() == 4
    args = (packed, st.absmax, st.code, bs)
    nested = (st.state2.absmax, st.state2.code, st.offset)
    for dtype in DTYPES:
        want = ref.dequantize_4bit(*args, n, dtype, *nested)
        assert torch.equal(tb.dequantize_4bit(*args, n, dtype, *nested), want)
        out = torch.empty(n, dtype=dtype, device=DEV)
        tb.dequantize_4bit_out(*args, *nested, out)
        assert torch.equal(out, want)


def test_dequantize_4bit_bad_arguments(rng):
    p, a = tb.quantize_4bit(_data(100, torch.float32, rng), 64, "nf4")
    code = get_4bit_code("nf4", DEV)
    with pytest.raises(ValueError, match="absmax has"):
        tb.dequantize_4bit(p, a[:1], code, 64, 100, torch.float32)
    with pytest.raises(ValueError, match="packed holds"):
        tb.dequantize_4bit(p, a, code, 64, 120, torch.float32)
    with pytest.raises(TypeError, match="uint8 absmax needs"):
        tb.dequantize_4bit(p, a.to(torch.uint8), code, 64, 100, torch.float32)
    with pytest.raises(ValueError, match="go together"):
        tb.dequantize_4bit(p, a, code, 64, 100, torch.float32, nested_absmax=a)
    with pytest.raises(TypeError, match="dtype must be"):
        tb.dequantize_4bit(p, a, code, 64, 100, torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        tb.dequantize_4bit_out(p, a, code, 64, None, None, 0.0,
                               torch.empty(200, device=DEV)[::2])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tb.quantize_4bit(torch.ones(8, dtype=torch.int32, device=DEV), 64, "nf4")
    with pytest.raises(ValueError, match="blocksize"):
        tb.quantize_4bit(torch.ones(8, device=DEV), 48, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        tb.quantize_4bit(torch.ones(8, device=DEV), 64, "nf5")


# --- 8-bit blockwise ----------------------------------------------------------------------
@pytest.mark.parametrize("code_name", ["dynamic", "fp8"])
def test_quantize_dequantize_8bit_bitexact(code_name, rng):
    code = (dynamic_map() if code_name == "dynamic" else fp8_e4m3_map()).to(DEV)
    # 256 (double quant), 100 (not a power of two), 20000 (swept in two chunks on the
    # interpreter, whose tiles hold 16384 elements; ten on a GPU)
    for blocksize, dtype, n in [(256, torch.float32, 333 * 77), (100, torch.bfloat16, 65),
                                (20000, torch.float16, 333 * 77), (256, torch.float32, 1),
                                (100, torch.float32, 333 * 77)]:
        x = _data(n, dtype, rng, blocksize)
        if n > 300:
            x[300] = 0.0
            x[301] = code[200].item()  # exact code values and midpoints
        q, a = tb.quantize_8bit(x, code, blocksize)
        q_ref, a_ref = ref.quantize_8bit(x, code, blocksize)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(q, q_ref)  # finite data: every code must match
        for out_dtype in DTYPES:
            assert torch.equal(tb.dequantize_8bit(q, a, code, blocksize, out_dtype),
                               ref.dequantize_8bit(q, a, code, blocksize, out_dtype))


@IGNORE_INF_TIMES_ZERO
def test_quantize_8bit_ties_nan_inf_zero():
    code = dynamic_map().to(DEV)
    mids = (code[:-1] + code[1:]) * 0.5
    x = torch.cat([torch.ones(1, device=DEV), mids, code[:-1]])  # absmax 1: s == x
    q, a = tb.quantize_8bit(x, code, x.numel())
    assert a.item() == 1.0
    assert torch.equal(q, ref.quantize_8bit(x, code, x.numel())[0])
    assert torch.equal(q[1:256].long(), torch.arange(255, device=DEV))  # ties -> lower
    y = torch.randn(4 * 64, device=DEV)
    y[:64] = 0.0
    y[64 + 3] = float("nan")
    y[128 + 9] = float("-inf")
    q, a = tb.quantize_8bit(y, code, 64)
    q_ref, _ = ref.quantize_8bit(y, code, 64)
    _assert_codes_equal(q.long(), q_ref.long(), y)
    assert a[0].item() == 0.0 and torch.isnan(a[1]) and a[2].item() == float("inf")
    assert torch.isfinite(a[3])


# --- GEMM -------------------------------------------------------------------------------
GEMM_SHAPES = [(64, 64, 64), (96, 200, 64), (33, 150, 32)]  # N, K, blocksize
# (M, dtype) pairs, rotated per shape so every M meets every dtype across the tests
M_DTYPE = [(1, torch.float32), (7, torch.float16), (33, torch.bfloat16)]
GEMM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape_index", range(len(GEMM_SHAPES)))
def test_matmul_4bit(shape_index, nested, transpose_w, rng):
    N, K, bs = GEMM_SHAPES[shape_index]
    W = torch.randn(N, K, generator=rng).to(DEV)
    packed, st = qk.quantize_4bit(W, bs, "nf4", double_quant=nested, backend="torch")
    extra = dict(nested_absmax=st.state2.absmax, nested_code=st.state2.code,
                 offset=st.offset) if nested else {}
    for j in range(3):
        M, dtype = M_DTYPE[(j + shape_index) % 3]
        x = torch.randn(M, N if transpose_w else K, generator=rng).to(dtype).to(DEV)
        y = tb.matmul_4bit_triton(x, packed, st.absmax, st.code, bs, N, K,
                           transpose_w=transpose_w, **extra)
        # the kernel multiplies x by W rounded to x.dtype and accumulates in float32
        Wd = qk.dequantize_4bit(packed, st, dtype=dtype, backend="torch").float()
        want = x.float() @ (Wd if transpose_w else Wd.T)
        assert y.dtype == dtype and y.shape == want.shape
        tol = GEMM_TOL[dtype]
        torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_matmul_autotune_keys_on_a_bucket_of_m():
    # a new token count must not re-run the autotuner's benchmarks: tuned per power of two
    from qlora_kernels.triton.matmul_4bit import _matmul_4bit_kernel
    assert "M" not in _matmul_4bit_kernel.keys and "M_BUCKET" in _matmul_4bit_kernel.keys
    from qlora_kernels.triton._common import next_pow2
    assert [next_pow2(m) for m in (1, 2, 3, 300, 512, 513)] == [1, 2, 4, 512, 512, 1024]


def test_matmul_4bit_leading_dims_and_errors(rng):
    N, K, bs = 64, 96, 64
    W = torch.randn(N, K, generator=rng).to(DEV)
    p, a = tb.quantize_4bit(W, bs, "fp4")
    code = get_4bit_code("fp4", DEV)
    x = torch.randn(2, 3, K, generator=rng).to(DEV)
    y = tb.matmul_4bit_triton(x, p, a, code, bs, N, K)
    Wd = ref.dequantize_4bit(p, a, code, bs, N * K, torch.float32).view(N, K)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y, x @ Wd.T, rtol=1e-5, atol=1e-4)
    xt = torch.randn(K, 5, generator=rng).to(DEV).t()  # non-contiguous rows
    torch.testing.assert_close(tb.matmul_4bit_triton(xt, p, a, code, bs, N, K), xt @ Wd.T,
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="last dim must be"):
        tb.matmul_4bit_triton(torch.randn(3, K + 1, device=DEV), p, a, code, bs, N, K)
    with pytest.raises(TypeError, match="x must be"):
        tb.matmul_4bit_triton(torch.ones(3, K, dtype=torch.int64, device=DEV), p, a, code, bs, N, K)
    with pytest.raises(ValueError, match="absmax has"):
        tb.matmul_4bit_triton(torch.randn(3, K, device=DEV), p, a, code, 32, N, K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_4bit_bias_is_rounded_once(dtype, rng):
    # one nonzero x per row makes the float32 sum exact, so the only roundings are the
    # ones under test: (x @ W^T + bias) rounded once to dtype, as the GEMV and CPU paths do
    N, K, bs, M = 96, 64, 64, 40
    W = torch.randn(N, K, generator=rng).to(DEV)
    packed, st = qk.quantize_4bit(W, bs, "nf4", double_quant=False, backend="torch")
    x = torch.zeros(M, K)
    x[torch.arange(M), torch.randint(0, K, (M,), generator=rng)] = torch.randn(M, generator=rng)
    x = x.to(dtype).to(DEV)
    bias = (torch.randn(N, generator=rng) * 3).to(DEV)
    Wd = qk.dequantize_4bit(packed, st, out_dtype=dtype, backend="torch").float()
    exact = x.float() @ Wd.T + bias
    want = exact.to(dtype)
    rounded_twice = ((x.float() @ Wd.T).to(dtype).float() + bias).to(dtype)
    assert not torch.equal(want, rounded_twice)  # the data tells the two apart
    got = tb.matmul_4bit_triton(x, packed, st.absmax, st.code, bs, N, K, bias=bias)
    assert torch.equal(got, want)
    # through the op with Triton selected: the bias goes into the kernel's float32 sum
    with qk.use_backend("triton"):
        got = torch.ops.qlora_kernels.matmul_4bit(x, packed, st.absmax, st.code, bs, N, None,
                                                  None, 0.0, bias.to(dtype))
    assert torch.equal(got, (x.float() @ Wd.T + bias.to(dtype).float()).to(dtype))
    with pytest.raises(ValueError, match="bias"):
        tb.matmul_4bit_triton(x, packed, st.absmax, st.code, bs, N, K, bias=bias[:-1])


# --- through the public API ---------------------------------------------------------------
def test_public_api_backend_triton(rng):
    x = _data(333 * 77, torch.bfloat16, rng).view(333, 77)
    p, st = qk.quantize_4bit(x, 64, "fp4", backend="triton")
    p_ref, st_ref = qk.quantize_4bit(x, 64, "fp4", backend="torch")
    assert torch.equal(p, p_ref) and torch.equal(st.absmax, st_ref.absmax)
    assert st.offset == st_ref.offset
    assert torch.equal(st.state2.absmax, st_ref.state2.absmax)
    got = qk.dequantize_4bit(p, st, backend="triton")
    assert got.shape == (333, 77) and got.dtype == torch.bfloat16
    assert torch.equal(got, qk.dequantize_4bit(p, st, backend="torch"))
    bad = x.clone()
    bad[5, 5] = float("nan")
    with pytest.raises(ValueError):
        qk.quantize_4bit(bad, 64, "nf4", backend="triton")
