"""The fused QLoRA Function (lora_fused.py) against the composition of a dense layer with
the dequantized weight and two nn.Linear: outputs and the gradients of x, A, B and bias,
every compute dtype, odd sizes, GEMV and GEMM paths, dropout, and what it saves."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import lora_fused
from qlora_kernels import matmul as mm
from qlora_kernels.lora_fused import qlora_linear

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _setup(rng, n, k, r, dtype, bias):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=rng))
    base = qk.Linear4bit.from_linear(lin, compute_dtype=dtype)
    layer = qk.QLoRALinear(base, r=r, lora_alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(n, r, generator=rng) * 0.1)
    return layer


def _reference(layer, x, mask=None, p=0.0):
    """The layer recomputed densely in float32 from its dequantized weight."""
    base = layer.base_layer
    w = base.dequantize(torch.float32)
    a = layer.lora_A.weight.detach().float().requires_grad_()
    b = layer.lora_B.weight.detach().float().requires_grad_()
    xr = x.detach().float().requires_grad_()
    xd = xr if mask is None else xr * mask / (1 - p)
    y = xr @ w.T + layer.scaling * (xd @ a.T) @ b.T
    if base.bias is not None:
        y = y + base.bias.float()
    return y, xr, a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 130])
@pytest.mark.parametrize("shape", [(48, 96), (77, 128), (130, 64)])
def test_fused_matches_dense_reference(dtype, rows, shape, rng):
    n, k = shape
    layer = _setup(rng, n, k, 4, dtype, bias=n % 2 == 1)
    x = torch.randn(2, rows, k, generator=rng).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, rows, n)
    g = torch.randn(y.shape, generator=rng).to(dtype)
    y.backward(g)
    want, xr, a, b = _reference(layer, x)
    want.backward(g.float())
    tol = TOL[dtype]
    assert _rel(y, want) < tol
    assert _rel(x.grad, xr.grad) < tol
    assert layer.lora_A.weight.grad.dtype == dtype
    assert _rel(layer.lora_A.weight.grad, a.grad) < tol
    assert _rel(layer.lora_B.weight.grad, b.grad) < tol


def test_fused_gemm_tiles(rng, monkeypatch):
    # small tiles: several row tiles forward, several column tiles backward
    monkeypatch.setattr(mm, "SMALL_TILE_BYTES", 64 * 128 * 4)
    monkeypatch.setattr(mm, "MIN_TILE_ROWS", 1)
    layer = _setup(rng, 300, 256, 8, torch.float32, bias=True)
    x = torch.randn(40, 256, generator=rng, requires_grad=True)
    y = layer(x)
    g = torch.randn(y.shape, generator=rng)
    y.backward(g)
    want, xr, a, b = _reference(layer, x)
    want.backward(g)
    assert _rel(y, want) < 2e-5 and _rel(x.grad, xr.grad) < 2e-5
    assert _rel(layer.lora_A.weight.grad, a.grad) < 2e-5


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded-op", "saved-mask"])
def test_fused_dropout_uses_one_mask(seeded, rng, monkeypatch):
    """Forward and backward apply the same draw: the layer matches the dense reference with
    the mask its own draw applies (read back from that draw), on the CPU's seeded op and
    on the saved-mask path other devices take."""
    draws = []
    real_draw = lora_fused._Dropout.draw

    def recorded(x, p):
        drop, mask = real_draw(x, p)
        draws.append((drop.seed is not None, drop.apply(torch.ones(x.shape), mask)))
        return drop, mask

    monkeypatch.setattr(lora_fused._Dropout, "draw", recorded)
    if not seeded:
        monkeypatch.setattr(lora_fused, "_SEEDED_DEVICES", ())
    layer = _setup(rng, 64, 128, 4, torch.float32, bias=False)
    layer.lora_dropout = torch.nn.Dropout(0.3)
    layer.train()
    x = torch.randn(9, 128, generator=rng, requires_grad=True)
    y = layer(x)
    ((used_seed, kept),) = draws  # kept: mask / P(keep)
    assert used_seed == seeded
    assert 0 < kept.count_nonzero() < kept.numel()
    scale = kept.max().item()
    g = torch.randn(y.shape, generator=rng)
    y.backward(g)
    want, xr, a, b = _reference(layer, x, (kept > 0).float(), 1 - 1 / scale)
    want.backward(g)
    assert _rel(y, want) < 2e-5 and _rel(x.grad, xr.grad) < 2e-5
    assert _rel(layer.lora_A.weight.grad, a.grad) < 2e-5
    assert _rel(layer.lora_B.weight.grad, b.grad) < 2e-5
    layer.eval()  # no dropout in eval mode
    torch.testing.assert_close(layer(x), _reference(layer, x)[0], rtol=2e-5, atol=2e-5)


def test_fused_saves_x_and_xa_not_copies(rng):
    layer = _setup(rng, 64, 128, 4, torch.bfloat16, bias=False)
    x = torch.randn(33, 128, generator=rng).to(torch.bfloat16).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    state = {b.data_ptr() for b in layer.base_layer.buffers()}  # absmax, codes: not copies
    float_saved = [t for t in saved if t.is_floating_point() and t.data_ptr() not in state]
    shapes = sorted(tuple(t.shape) for t in float_saved)
    # x itself (no copy), x·Aᵀ and the two adapter weights; never a dense W
    assert any(t.data_ptr() == x.data_ptr() for t in float_saved)
    assert shapes == sorted([(33, 128), (33, 4), (4, 128), (64, 4)])


def test_qlora_linear_checks(rng):
    packed, state = qk.quantize_4bit(torch.randn(8, 64, generator=rng))
    a, b = torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(ValueError, match="do not chain"):
        qlora_linear(torch.randn(3, 32), packed, state, a, b, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        qlora_linear(torch.randn(3, 64), packed, state, a.bfloat16(), b, 1.0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_dropout_keep_mask_rate_in_every_lane(p):
    """Each element dropped with probability p (to 2**-16), in each of the four 16-bit lanes
    of a 64-bit draw (a biased lane, e.g. the sign bit random_() leaves 0, would show), and
    the kept elements scaled to keep the expectation."""
    torch.manual_seed(11)
    n = 400_000
    mask, scale = lora_fused.dropout_keep_mask((n // 50, 50), p)
    assert mask.dtype == torch.bool and mask.shape == (n // 50, 50)
    dropped = (~mask).reshape(-1, 4).float().mean(0)  # one rate per lane
    sigma = (p * (1 - p) / (n / 4)) ** 0.5
    assert ((dropped - p).abs() < 5 * sigma).all(), dropped
    assert abs(scale * (1 - p) - 1) <= 2 ** -17 / (1 - p)  # p rounded to k / 2**16
    other, _ = lora_fused.dropout_keep_mask((n // 50, 50), p)
    assert not torch.equal(mask, other)  # fresh draws


def _seeded_keep(shape, seed, p):
    return torch.ops.qlora_kernels.dropout_seeded(torch.ones(shape), seed, p) != 0


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_dropout_seeded_rate_scale_and_independence(p):
    """Each element dropped with probability p in every SIMD lane position (index mod 16),
    neighbours independent (P(both dropped) = p**2), seeds s and s + 1 independent, and the
    kept elements scaled to keep the expectation."""
    n = 400_000
    keep = _seeded_keep((n // 16, 16), 11, p)
    per_lane = (~keep).float().mean(0)
    sigma = (p * (1 - p) / (n / 16)) ** 0.5
    assert ((per_lane - p).abs() < 5 * sigma).all(), per_lane
    flat = (~keep).reshape(-1)
    pairs = (flat[:-1] & flat[1:]).float().mean().item()
    assert abs(pairs - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5, pairs
    other = ~_seeded_keep((n // 16, 16), 12, p)
    both = (flat & other.reshape(-1)).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5, both
    y = torch.ops.qlora_kernels.dropout_seeded(torch.ones(10), 3, p)
    scale = y.max().item()
    assert abs(scale * (1 - p) - 1) < 1e-6


def test_dropout_seeded_same_bits_on_any_thread_count_and_layout(rng):
    x = torch.randn(300, 777, generator=rng)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.qlora_kernels.dropout_seeded(x, 99, 0.2)
        torch.set_num_threads(2)
        two = torch.ops.qlora_kernels.dropout_seeded(x, 99, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    # a transposed view is read in its logical (row-major) order
    xt = x.t()
    assert torch.equal(torch.ops.qlora_kernels.dropout_seeded(xt, 99, 0.2),
                       torch.ops.qlora_kernels.dropout_seeded(xt.contiguous(), 99, 0.2))
    assert not torch.equal(one, torch.ops.qlora_kernels.dropout_seeded(x, 100, 0.2))


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_dropout_seeded_refuses_bad_p(p):
    with pytest.raises(ValueError, match="p must be in"):
        torch.ops.qlora_kernels.dropout_seeded(torch.randn(4), 0, p)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.qlora_kernels.dropout_seeded(torch.ones(4, dtype=torch.int32), 0, 0.1)
