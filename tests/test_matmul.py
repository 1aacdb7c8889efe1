"""matmul_4bit (GEMV and GEMM paths), gradients, opcheck, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk
from qlora_kernels import matmul as mm
from qlora_kernels.backends import reference as ref

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _weight(n, k, rng, double_quant=True, dtype=torch.float32):
    w = torch.randn(n, k, generator=rng).to(dtype)
    return qk.quantize_4bit(w, double_quant=double_quant)


def _reference(x, packed, state, bias=None):
    w = qk.dequantize_4bit(packed, state, dtype=torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float())


def _close(got, want, dtype):
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got.float() - want).abs().max() / scale).item()
    assert err <= TOL[dtype], err


@pytest.fixture(params=["gemv", "gemm"])
def path(request):
    old = dict(mm.GEMV_MAX_ROWS)
    mm.set_gemv_max_rows(10**9 if request.param == "gemv" else 0, "cpu")
    yield request.param
    mm.GEMV_MAX_ROWS.update(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(77, 333), (64, 128), (96, 4096 + 64)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(path, dtype, shape, double_quant, bias, rng):
    n, k = shape
    packed, state = _weight(n, k, rng, double_quant)
    b = torch.randn(n, generator=rng).to(dtype) if bias else None
    for m in (1, 2, 7, 64):
        x = torch.randn(m, k, generator=rng).to(dtype)
        y = qk.matmul_4bit(x, packed, state, b)
        assert y.dtype == dtype and y.shape == (m, n)
        _close(y, _reference(x, packed, state, b), dtype)


def test_llama_mlp_shape(rng):
    packed, state = _weight(4096, 11008, rng)
    for m in (1, 513):
        x = torch.randn(m, 11008, generator=rng)
        _close(qk.matmul_4bit(x, packed, state), _reference(x, packed, state), torch.float32)


def test_gemv_kernel_matches_reference_op(rng):
    for (n, k) in ((77, 333), (64, 256), (5, 63)):
        for dq in (True, False):
            packed, state = _weight(n, k, rng, dq)
            x = torch.randn(3, k, generator=rng)
            s2 = state.state2
            args = (packed, state.absmax, state.code, 64, n, None if s2 is None else s2.absmax,
                    None if s2 is None else s2.code, float(state.offset or 0.0))
            got = torch.ops.qlora_kernels.gemv_4bit(x, *args)
            want = ref.gemv_4bit(x, *args)
            _close(got, want.float(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(path, dtype, rng):
    n, k = 77, 333
    packed, state = _weight(n, k, rng)
    w = qk.dequantize_4bit(packed, state, dtype=torch.float32)
    b = torch.randn(n, generator=rng).to(dtype).requires_grad_()
    x = torch.randn(2, 7, k, generator=rng).to(dtype).requires_grad_()
    y = qk.matmul_4bit(x, packed, state, b)
    g = torch.randn(y.shape, generator=rng).to(dtype)
    y.backward(g)
    x_ref = x.detach().float().requires_grad_()
    b_ref = b.detach().float().requires_grad_()
    F.linear(x_ref, w, b_ref).backward(g.float())
    _close(x.grad, x_ref.grad, dtype)
    _close(b.grad, b_ref.grad, dtype)


def test_gradcheck_reference_path_float64(rng):
    # the autograd formula itself, in float64 through the reference ops
    packed, state = _weight(12, 64, rng, double_quant=False)
    # (float32 -> float64 is exact; the ops write float32/16/bf16 only)
    w = ref.dequantize_4bit(packed, state.absmax, state.code, 64, 12 * 64,
                            torch.float32).double().view(12, 64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: F.linear(x, w, b), (x, b))
    # the op's backward (float64 in, through the reference dequantize) is that formula's dx
    g = torch.randn(3, 12, dtype=torch.float64, generator=rng)
    got = torch.ops.qlora_kernels.matmul_4bit_backward(g, packed, state.absmax, state.code, 64, 64)
    assert torch.allclose(got, g @ w)


def test_weight_gets_no_gradient_and_nothing_dense_is_saved(rng):
    packed, state = _weight(64, 128, rng)
    x = torch.randn(4, 128, generator=rng, requires_grad=True)
    y = qk.matmul_4bit(x, packed, state)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    # what backward keeps: the packed bytes and the small state, never x or a float W
    assert all(t.dtype in (torch.uint8,) or t.numel() <= 256 for t in saved), \
        [(t.dtype, t.shape) for t in saved]
    assert sum(t.numel() * t.element_size() for t in saved) < 64 * 128  # < a float W's bytes/4
    y.sum().backward()
    assert packed.grad is None


def test_bad_inputs(rng):
    packed, state = _weight(64, 128, rng)
    with pytest.raises(ValueError, match="last dimension 100"):
        qk.matmul_4bit(torch.randn(2, 100), packed, state)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.int64"):
        qk.matmul_4bit(torch.randint(0, 3, (2, 128)), packed, state)
    other_packed, _ = _weight(32, 128, rng)
    with pytest.raises(ValueError, match="packed weight holds"):
        qk.matmul_4bit(torch.randn(2, 128), other_packed, state)
    with pytest.raises(ValueError, match="bias"):
        qk.matmul_4bit(torch.randn(2, 128), packed, state, torch.randn(3))


def test_opcheck(rng):
    packed, state = _weight(32, 64, rng)
    s2 = state.state2
    for m in (1, 9):
        x = torch.randn(m, 64, generator=rng, requires_grad=True)
        args = (x, packed, state.absmax, state.code, 64, 32, s2.absmax, s2.code,
                float(state.offset), torch.randn(32, generator=rng, requires_grad=True))
        torch.library.opcheck(torch.ops.qlora_kernels.matmul_4bit.default, args)
    for dtype in (torch.float32, torch.bfloat16):
        for bias in (None, torch.randn(32, generator=rng)):
            torch.library.opcheck(torch.ops.qlora_kernels.gemv_4bit.default,
                                  (torch.randn(2, 64, generator=rng).to(dtype), packed, state.absmax,
                                   state.code, 64, 32, s2.absmax, s2.code, float(state.offset),
                                   bias))
    torch.library.opcheck(torch.ops.qlora_kernels.matmul_4bit_backward.default,
                          (torch.randn(5, 32), packed, state.absmax, state.code, 64, 64,
                           s2.absmax, s2.code, float(state.offset)))


def test_torch_compile_fullgraph_mlp(rng):
    torch.manual_seed(0)
    model = torch.nn.Sequential(qk.Linear4bit(64, 128), torch.nn.GELU(), qk.Linear4bit(128, 32))
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 16):
        x = torch.randn(m, 64, generator=rng, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = compiled(x), model(x2)
        assert torch.allclose(y, y2, atol=1e-5)
        y.sum().backward()
        y2.sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-5)


@pytest.mark.parametrize("shape", [(77, 333), (300, 64), (1000, 96)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cpu_gemm_tiles_cover_every_row(shape, double_quant, rng, monkeypatch):
    # small tiles force many slices of packed bytes, absmax and nested scales
    monkeypatch.setattr(mm, "SMALL_TILE_BYTES", 4096 * 4)
    monkeypatch.setattr(mm, "TILE_BYTES", 4096 * 4)
    monkeypatch.setattr(mm, "MIN_TILE_ROWS", 1)
    monkeypatch.setitem(mm.GEMV_MAX_ROWS, "cpu", 0)
    n, k = shape
    packed, state = _weight(n, k, rng, double_quant)
    tiles = mm._row_tiles(n, k, 64, double_quant)
    assert tiles[0][0] == 0 and tiles[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
    if (n, k, double_quant) != (77, 333, True):  # odd K with DQ aligns only at 16384 rows
        assert len(tiles) > 1
    x = torch.randn(5, k, generator=rng, requires_grad=True)
    y = qk.matmul_4bit(x, packed, state)
    _close(y, _reference(x, packed, state), torch.float32)
    g = torch.randn(5, n, generator=rng)
    y.backward(g)
    w = qk.dequantize_4bit(packed, state, dtype=torch.float32)
    _close(x.grad, g @ w, torch.float32)


def test_cpu_tile_size_follows_the_rows_of_x(rng, monkeypatch):
    # the large tiles from LARGE_TILE_MIN_ROWS rows of x on, forward and backward; the
    # results are the same either way
    sizes = []
    real = mm._tile_len
    monkeypatch.setattr(mm, "_tile_len", lambda *a: sizes.append(a[3]) or real(*a))
    packed, state = _weight(64, 128, rng, True)
    for m in (mm.LARGE_TILE_MIN_ROWS - 1, mm.LARGE_TILE_MIN_ROWS):
        sizes.clear()
        x = torch.randn(m, 128, generator=rng, requires_grad=True)
        qk.matmul_4bit(x, packed, state).backward(torch.randn(m, 64, generator=rng))
        want = mm.TILE_BYTES if m >= mm.LARGE_TILE_MIN_ROWS else mm.SMALL_TILE_BYTES
        assert sizes == [want, want], (m, sizes)
    assert mm.SMALL_TILE_BYTES < mm.TILE_BYTES


def test_gpu_gemm_dequantizes_w_whole_into_x_dtype():
    # GPUs: one dequantize of all of W into x's dtype, then one cuBLAS GEMM (no tiles)
    cuda = torch.device("cuda")
    for n, k, nested in ((4096, 11008, True), (77, 333, True), (1000, 96, False)):
        assert mm._row_tiles(n, k, 64, nested, 2, mm._tile_bytes(cuda, 512)) == [(0, n)]
        assert mm._tile_len(n, 2, 64, mm._tile_bytes(cuda, 512)) >= k
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert mm.gemm_dtype(torch.empty(2, 3, dtype=dtype, device="meta")) == dtype


def test_cpu_gemm_tiles_are_not_thin():
    # a wide W (large K) still gets tiles of at least MIN_TILE_ROWS rows
    for n, k in ((4096, 11008), (4096, 14336), (4096, 4096)):
        for r0, r1 in mm._row_tiles(n, k, 64, True)[:-1]:
            assert r1 - r0 >= mm.MIN_TILE_ROWS


# ---------------------------------------------------- the CPU GEMV's bf16 fixed-point path
def _gemv_args(packed, state, n):
    s2 = state.state2
    return (packed, state.absmax, state.code, state.blocksize, n,
            None if s2 is None else s2.absmax, None if s2 is None else s2.code,
            float(state.offset or 0.0))


def _heavy_tailed(m, k, rng):
    """Activations with outliers: most groups of 64 span several binades."""
    return torch.randn(m, k, generator=rng) * torch.rand(m, k, generator=rng) ** 4 * 30


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_gemv_bf16_path_matches_float32_reference(quant_type, blocksize, double_quant, rng):
    # bf16 x with K a multiple of a blocksize >= 64 takes the block fixed-point kernel (int16
    # codes and x, exact pair sums); blocksize 32 falls back to the exact float kernel. Both
    # must stay within the bf16 output rounding of the float32 reference, with a bias.
    n, k = 37, 4 * 256
    w = torch.randn(n, k, generator=rng)
    packed, state = qk.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                     double_quant=double_quant)
    args = _gemv_args(packed, state, n)
    for m in (1, 2, 3, 4, 7, 8):  # row tiles of 4, 2 and 1
        x = _heavy_tailed(m, k, rng).bfloat16()
        b = torch.randn(n, generator=rng)
        got = torch.ops.qlora_kernels.gemv_4bit(x, *args, b)
        want = ref.gemv_4bit(x.float(), *args, b.float())
        assert got.dtype == torch.bfloat16
        # per element: one bf16 rounding of the output (2^-9) plus a small absolute part
        bound = want.abs() * 2.0 ** -8 + want.abs().max() * 1e-3
        assert ((got.float() - want).abs() <= bound).all(), (got.float() - want).abs().max()


def test_gemv_bf16_path_propagates_nan_inf_and_handles_tiny_x(rng):
    packed, state = _weight(16, 256, rng)
    args = _gemv_args(packed, state, 16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3, 256, generator=rng).bfloat16()
        x[1, 77] = bad
        got = torch.ops.qlora_kernels.gemv_4bit(x, *args)
        want = ref.gemv_4bit(x.float(), *args)
        assert torch.equal(got[1].float().isnan(), want[1].isnan())
        assert torch.equal(got[1].float().isinf(), want[1].isinf())
        _close(got[[0, 2]], want[[0, 2]], torch.bfloat16)
    # so small that a power-of-two int16 scale would underflow: the float kernel takes over
    x = (torch.randn(2, 256, generator=rng) * 1e-35).bfloat16()
    got = torch.ops.qlora_kernels.gemv_4bit(x, *args).float()
    want = ref.gemv_4bit(x.float(), *args)
    assert ((got - want).abs() <= want.abs() * 2.0 ** -8 + want.abs().max() * 1e-3).all()


def test_gemv_bias_is_added_before_the_one_rounding(rng):
    # a large bias next to a small product: adding it after rounding to fp16 would lose bits
    packed, state = _weight(8, 128, rng)
    args = _gemv_args(packed, state, 8)
    x = torch.randn(2, 128, generator=rng).half()
    b = torch.full((8,), 1000.0) + torch.rand(8, generator=rng)
    got = torch.ops.qlora_kernels.gemv_4bit(x, *args, b)
    want = ref.gemv_4bit(x, *args, b)  # float32 sum with the bias, then one rounding
    assert (got.float() - want.float()).abs().max() <= 0.5  # fp16 ulp at 1000 is 0.5


def test_no_grad_fast_path_equals_the_op(rng):
    # Without autograd, matmul_4bit calls the implementation directly; same numbers.
    packed, state = _weight(24, 128, rng)
    s2 = state.state2
    b = torch.randn(24, generator=rng)
    for m in (1, 5, 40):
        x = torch.randn(m, 128, generator=rng).bfloat16()
        with torch.no_grad():
            fast = qk.matmul_4bit(x, packed, state, b)
        op = torch.ops.qlora_kernels.matmul_4bit(x, packed, state.absmax, state.code, 64, 24,
                                                 s2.absmax, s2.code, float(state.offset), b)
        assert torch.equal(fast, op)


def test_gemv_threshold_per_dtype(monkeypatch):
    monkeypatch.setattr(mm, "GEMV_MAX_ROWS", dict(mm.GEMV_MAX_ROWS))
    monkeypatch.delenv("QLORA_KERNELS_GEMV_MAX_ROWS", raising=False)
    # measured defaults: the bf16 fixed-point GEMV wins to 64 rows against a float32 GEMM,
    # to 16 against the bf16 GEMM of a CPU with native bf16; the float GEMV to 8
    native = qk.cpu_dispatch.native_bf16()
    assert mm.gemv_max_rows("cpu", torch.bfloat16) == (16 if native else 64)
    assert mm.gemv_max_rows("cpu", torch.float32) == mm.gemv_max_rows("cpu", torch.float16) == 8
    mm.set_gemv_max_rows(3, "cpu", torch.float16)
    assert mm.gemv_max_rows("cpu", torch.float16) == 3
    assert mm.gemv_max_rows("cpu", torch.float32) == 8
    mm.set_gemv_max_rows(5, "cpu")  # no dtype: every dtype on the device
    assert mm.gemv_max_rows("cpu", torch.bfloat16) == mm.gemv_max_rows("cpu", torch.float16) == 5
    monkeypatch.setenv("QLORA_KERNELS_GEMV_MAX_ROWS", "11")
    assert mm.gemv_max_rows("cpu", torch.bfloat16) == 11
