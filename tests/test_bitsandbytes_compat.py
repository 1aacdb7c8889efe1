"""Cross-checks against the real bitsandbytes on the CPU (skipped when it is not installed).

bitsandbytes is never a dependency; these tests run only where it happens to be installed
(checked with bitsandbytes 0.50.2, CPU backend). /work/shared/FORMAT.md is the contract:
our 4-bit bytes are those of bitsandbytes' CUDA kernel (checked against the port in
test_bnb_exact_bytes.py). bitsandbytes' CPU quantizer is not the byte reference; where its
bytes differ from ours the difference must be one of its known deviations (below).

Known deviations of bitsandbytes 0.50.2 on the CPU (decoded values are unaffected, or the
codes are one step apart at a rounding boundary):
  * FP4 zero: bitsandbytes' 4-bit quantizer sorts the table and bucketizes, and the sort
    puts +0 before -0, so it sets the sign bit on small *positive* values and clears it
    on small negative ones; FORMAT.md sets the sign bit when s < 0. Both decode to 0.
  * thresholds: bitsandbytes' CPU quantizer uses fl32((a + b) / 2) and bucketize, not its
    CUDA kernel's literals and strict comparisons; s values within a few ulps of a
    threshold (bf16/fp16 inputs hit them) can go to the neighbouring code.
  * 4-bit decode: its CPU C kernel misdecodes weights whose rows are not a whole number of
    blocks (see test_bitsandbytes_cpu_kernel_misdecodes_rows_not_a_multiple_of_blocksize).
  * 8-bit (double quantization) codes: bitsandbytes' CPU quantize_blockwise looks the
    normalized value up in a 65536-entry table ((s + 1) / 2 on a 1/65535 grid), so within
    ~2/65535 of a midpoint it may pick the farther code (about 0.2% of the absmax codes);
    ours takes the nearest. A nested block of scale 0 gets code 0 there (0 * 1/0 = NaN);
    it decodes to the offset either way.
"""
import pytest
import torch

import qlora_kernels as qk

from test_bnb_exact_bytes import port_quantize

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

SHAPES = [(333, 77), (1, 63), (128, 256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LUT_STEP = 2.0 / 65535  # resolution of bitsandbytes' CPU 8-bit quantizer in s


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes wraps its pure-torch kernels in torch.compile; compiling every new shape
    # costs seconds here and changes no value (the same float32 ops run either way).
    with torch.compiler.set_stance("force_eager"):
        yield


def _codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of a packed uint8 tensor (element 2j in the high nibble)."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n]


def _scaled(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """s = x * (1 / absmax) per block, in float32 as FORMAT.md specifies."""
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    inv = inv.repeat_interleave(blocksize)[: x.numel()]
    return x.reshape(-1).float() * inv


def _check_nearest(s, ours, theirs, table, tol):
    """At every index where the codes differ, ours must be the nearest table value to s
    (ties: the lower value), and bitsandbytes' value may be farther from s by at most
    ``tol(s)`` (a rounding boundary, not a different encoding). Returns the number of
    such indices."""
    idx = (ours != theirs).nonzero().flatten()
    if idx.numel() == 0:
        return 0
    s64 = s[idx].double()
    vo, vt = table.double()[ours[idx]], table.double()[theirs[idx]]
    do, dt = (s64 - vo).abs(), (s64 - vt).abs()
    lower = vo < vt
    nearest = (do < dt) | ((do == dt) & lower)
    assert bool(nearest.all()), (
        f"ours is not the nearest code at {idx[~nearest][:5].tolist()}: s={s64[~nearest][:5].tolist()} "
        f"ours={vo[~nearest][:5].tolist()} bitsandbytes={vt[~nearest][:5].tolist()}")
    excess = dt - do
    assert bool((excess <= tol(s64)).all()), (
        f"bitsandbytes' code is {excess.max().item():.3g} farther from s than ours: not a rounding case")
    return idx.numel()


def _check_4bit_codes(w, ours_packed, bnb_packed, absmax, blocksize, qt):
    """Ours are FORMAT.md's bytes (the port of bitsandbytes' CUDA decision tree in
    test_bnb_exact_bytes.py), pad nibble included; bitsandbytes' CPU codes may differ
    only where s sits within a few ulps of a threshold. Returns the number of such codes."""
    n = w.numel()
    want, _ = port_quantize(w, blocksize, qt)
    assert torch.equal(ours_packed.reshape(-1), want.reshape(-1))
    ours, theirs = _codes(ours_packed, n), _codes(bnb_packed, n)
    if qt == "fp4":
        # a +-0 difference is bitsandbytes' CPU sort-based sign (module docstring)
        zero = ((ours == 0) | (ours == 8)) & ((theirs == 0) | (theirs == 8))
        theirs = torch.where(zero, ours, theirs)
    idx = (ours != theirs).nonzero().flatten()
    if idx.numel() == 0:
        return 0
    table = qk.formats.get_4bit_code(qt).double()
    s64 = _scaled(w, absmax, blocksize)[idx].double()
    excess = (s64 - table[theirs[idx]]).abs() - (s64 - table[ours[idx]]).abs()
    # 4 ulps: both sides' thresholds are float32 roundings of the same midpoints
    tol = 4 * 2.0 ** (torch.floor(torch.log2(s64.abs())) - 23)
    assert bool((excess.abs() <= tol).all()), (
        f"bitsandbytes' CPU code differs from ours by more than a rounding step at "
        f"{idx[excess.abs() > tol][:5].tolist()}")
    return idx.numel()


def _check_cross_decode(bp, bst, op, ost):
    """Each library decodes the other's packed weight and state (through the state-dict
    form) bit for bit as the other does. Returns (ours of bnb's state, bnb's of ours)."""
    ours_of_bnb = qk.QuantState.from_dict(bst.as_dict(packed=True))
    bnb_of_ours = BF.QuantState.from_dict(ost.as_dict(packed=True), device="cpu")
    assert torch.equal(qk.dequantize_4bit(bp, ours_of_bnb), BF.dequantize_4bit(bp, bst))
    assert torch.equal(BF.dequantize_4bit(op, bnb_of_ours), qk.dequantize_4bit(op, ost))
    return ours_of_bnb, bnb_of_ours


def _grid(shapes):
    """Parametrize over quant type x blocksize x input dtype x shape."""
    marks = [pytest.mark.parametrize("qt", ["nf4", "fp4"]),
             pytest.mark.parametrize("blocksize", [64, 128]),
             pytest.mark.parametrize("dtype", DTYPES, ids=str),
             pytest.mark.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s)))]

    def apply(fn):
        for mark in marks:
            fn = mark(fn)
        return fn
    return apply


@_grid(SHAPES)
def test_quantize_4bit_matches_bitsandbytes(qt, blocksize, dtype, shape, rng):
    w = torch.randn(*shape, generator=rng).to(dtype)
    bp, bst = BF.quantize_4bit(w, blocksize=blocksize, quant_type=qt, compress_statistics=False)
    op, ost = qk.quantize_4bit(w, blocksize=blocksize, quant_type=qt, double_quant=False)
    assert bp.dtype == op.dtype == torch.uint8 and bp.shape == op.shape
    assert torch.equal(bst.absmax, ost.absmax)
    assert torch.equal(bst.code, ost.code)
    ndiff = _check_4bit_codes(w, op, bp, ost.absmax, blocksize, qt)
    if dtype == torch.float32 or qt == "nf4":
        assert ndiff == 0  # with these seeds no float32 (or NF4) s sits on a midpoint
    _check_cross_decode(bp, bst, op, ost)
    if ndiff == 0:
        assert torch.equal(qk.dequantize_4bit(op, ost), BF.dequantize_4bit(bp, bst))


@_grid([(333, 77), (256, 512), (1, 63)])
def test_double_quant_matches_bitsandbytes(qt, blocksize, dtype, shape, rng):
    w = torch.randn(*shape, generator=rng).to(dtype)
    bp, bst = BF.quantize_4bit(w, blocksize=blocksize, quant_type=qt, compress_statistics=True)
    op, ost = qk.quantize_4bit(w, blocksize=blocksize, quant_type=qt, double_quant=True,
                               dq_code="dynamic")
    assert bst.nested and ost.nested
    assert bst.state2.blocksize == ost.state2.blocksize == 256
    # bitsandbytes' nested code is the signed dynamic map: ours, value for value
    assert torch.equal(bst.state2.code, ost.state2.code)
    assert float(bst.offset) == ost.offset
    assert torch.equal(bst.state2.absmax, ost.state2.absmax)
    plain = qk.quantize_4bit(w, blocksize=blocksize, quant_type=qt, double_quant=False)[1].absmax
    _check_4bit_codes(w, op, bp, plain, blocksize, qt)
    # 8-bit codes of (absmax - offset): ours nearest, bitsandbytes within its LUT step.
    # A nested block whose scale is 0 (all its absmax equal the mean, e.g. a single block)
    # decodes to the offset whatever its codes: bitsandbytes computes 0 * (1/0) = NaN there
    # and stores code 0; ours stores the code of 0.0. Not compared.
    s = _scaled(plain - ost.offset, ost.state2.absmax, 256)
    live = ost.state2.absmax.repeat_interleave(256)[: s.numel()] != 0
    ndiff8 = _check_nearest(s[live], ost.absmax.long()[live], bst.absmax.long()[live],
                            ost.state2.code, lambda s64: torch.full_like(s64, 2 * LUT_STEP))
    assert ndiff8 <= max(1, plain.numel() // 100)
    # the nested state decodes identically in both libraries, in both directions
    ours_of_bnb, bnb_of_ours = _check_cross_decode(bp, bst, op, ost)
    bnb_absmax = BF.dequantize_blockwise(bst.absmax, bst.state2) + bst.offset
    assert torch.equal(qk.dequantize_absmax(ours_of_bnb), bnb_absmax)
    assert torch.equal(BF.dequantize_blockwise(ost.absmax, bnb_of_ours.state2) + bnb_of_ours.offset,
                       qk.dequantize_absmax(ost))


def _bnb_linear_from(lin: torch.nn.Linear, qt, double_quant, compute_dtype):
    blin = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                             compute_dtype=compute_dtype, compress_statistics=double_quant,
                             quant_type=qt)
    blin.load_state_dict(lin.state_dict())
    return blin.to("cpu")  # bitsandbytes quantizes on the first move to a device


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_bitsandbytes_linear4bit_state_dict_loads_into_ours(qt, double_quant, compute_dtype, rng):
    lin = torch.nn.Linear(192, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 192, generator=rng) * 0.05)
        lin.bias.copy_(torch.randn(96, generator=rng))
    blin = _bnb_linear_from(lin, qt, double_quant, compute_dtype)
    sd = blin.state_dict()
    assert f"weight.quant_state.bitsandbytes__{qt}" in sd
    ours = qk.Linear4bit(192, 96, compute_dtype=compute_dtype, quant_type=qt, double_quant=double_quant)
    ours.load_state_dict(sd)  # strict: every bitsandbytes key is known
    assert torch.equal(ours.dequantize(torch.float32),
                       BF.dequantize_4bit(blin.weight, blin.weight.quant_state).float())
    x = torch.randn(5, 192, generator=rng)
    with torch.no_grad():
        want, got = blin(x), ours(x)
    assert got.dtype == want.dtype == x.dtype
    torch.testing.assert_close(got, want, **_tol(compute_dtype))
    # and our state_dict of it is again the bitsandbytes one, tensor for tensor
    mine = ours.state_dict()
    assert set(mine) == set(sd)
    for k, v in sd.items():
        assert torch.equal(mine[k], v), k


@pytest.mark.parametrize("dq_code", ["fp8", "dynamic", None], ids=["fp8", "dynamic", "plain"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_our_linear4bit_state_dict_loads_into_bitsandbytes(qt, dq_code, rng):
    # in_features a multiple of the blocksize: see the next test for why
    lin = torch.nn.Linear(192, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 192, generator=rng) * 0.05)
    ours = qk.Linear4bit.from_linear(lin, quant_type=qt, double_quant=dq_code is not None,
                                     dq_code=dq_code or "fp8", compute_dtype=torch.float32)
    blin = _bnb_linear_from_state_dict(ours.state_dict(), 192, 48, qt)
    assert blin.weight.quant_state.nested == (dq_code is not None)
    # bitsandbytes decodes the nested absmax with the stored nested_quant_map, FP8 included
    assert torch.equal(BF.dequantize_4bit(blin.weight, blin.weight.quant_state), ours.dequantize())
    x = torch.randn(3, 7, 192, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(blin(x), ours(x), **_tol(torch.float32))


def _bnb_linear_from_state_dict(sd, in_features, out_features, qt):
    # as transformers loads a pre-quantized checkpoint: Params4bit.from_prequantized
    blin = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32,
                             quant_type=qt, device="meta")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    blin.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=blin)
    blin.bias = torch.nn.Parameter(sd["bias"].clone())
    return blin


@pytest.mark.parametrize("dq_code", ["fp8", None], ids=["fp8", "plain"])
def test_bitsandbytes_cpu_kernel_misdecodes_rows_not_a_multiple_of_blocksize(dq_code, rng):
    # bitsandbytes 0.50.2's CPU 4-bit decoder (cdequantize_blockwise_cpu_nf4_*, used when
    # the row length is even) decodes wrongly when rows are not a whole number of blocks:
    # its decode of its OWN quantization of a 48 x 160 weight differs from FORMAT.md's. Our
    # bytes are not at fault: its generic torch decoder (the path it takes for odd rows)
    # decodes our state dict exactly as we do. When this test fails, bitsandbytes fixed it:
    # fold the shape back into the test above.
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    w = torch.randn(48, 160, generator=rng) * 0.05
    bp, bst = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours_of_bnb = qk.dequantize_4bit(bp, qk.QuantState.from_dict(bst.as_dict(packed=True)))
    assert not torch.equal(BF.dequantize_4bit(bp, bst), ours_of_bnb)
    lin = torch.nn.Linear(160, 48)
    ours = qk.Linear4bit.from_linear(lin, double_quant=dq_code is not None,
                                     dq_code=dq_code or "fp8", compute_dtype=torch.float32)
    blin = _bnb_linear_from_state_dict(ours.state_dict(), 160, 48, "nf4")
    qs = blin.weight.quant_state
    absmax = (BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if qs.nested else qs.absmax
    generic = _dequantize_4bit_compute(blin.weight.reshape(-1), absmax.float(), qs.code,
                                       qs.blocksize, qs.shape, qs.dtype)
    assert torch.equal(generic, ours.dequantize())
