"""The code tables: C++ header == Python, NF4 == normal quantiles, FP8/dynamic maps."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _extension, formats

NF4_FROM_FORMAT_MD = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
NF4_THRESHOLDS_FROM_FORMAT_MD = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def test_nf4_matches_format_byte_for_byte():
    got = qk.get_4bit_code("nf4")
    want = torch.tensor(NF4_FROM_FORMAT_MD, dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_nf4_rebuilt_from_normal_quantiles():
    rebuilt = qk.nf4_from_normal_quantiles()
    assert (rebuilt - qk.get_4bit_code("nf4")).abs().max().item() <= 1e-7
    assert rebuilt[7].item() == 0.0  # index 7 is exact zero


def test_nf4_thresholds_are_the_format_literals():
    # each threshold is the float32 nearest the decimal literal (no float32 closer to it)
    from fractions import Fraction
    thr = formats.encode_thresholds("nf4")
    for t, text in zip(thr, NF4_THRESHOLDS_FROM_FORMAT_MD):
        exact = Fraction(repr(text))
        d = abs(Fraction(t.item()) - exact)
        for nb in (torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)):
            assert d <= abs(Fraction(nb.item()) - exact), text


def test_nf4_literals_differ_from_nearest_midpoints():
    # the reason the literals matter: for some thresholds, values between the literal and
    # the exact midpoint encode differently from a nearest-value rule (bitsandbytes' bytes)
    thr = formats.encode_thresholds("nf4")
    nearest_rule = formats.floor_midpoints(qk.get_4bit_code("nf4"))
    assert (thr != nearest_rule).sum().item() == 4
    fp4 = formats.encode_thresholds("fp4")
    fp4_rule = formats.floor_midpoints(qk.get_4bit_code("fp4")[:8].sort().values)
    assert (fp4 != fp4_rule).sum().item() == 3


def test_int4_encode_is_nearest_with_ties_low():
    # INT4 is ours: values at, just above and just below every midpoint, plus random ones;
    # the nearest value in float64 with ties to the lower index (argmin: first minimum)
    from qlora_kernels.backends import reference as ref
    code = qk.get_4bit_code("int4").double()
    s = ((code[:-1] + code[1:]) / 2).float()
    s = torch.cat([s, torch.nextafter(s, s + 1), torch.nextafter(s, s - 1),
                   torch.rand(1000) * 2 - 1])
    dist = (s.double()[:, None] - code[None, :]).abs()
    assert torch.equal(ref.encode_4bit(s, "int4"), torch.argmin(dist, dim=1))


def test_fp4_table_is_e2m1_in_bit_order():
    code = qk.get_4bit_code("fp4")
    want = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12
    assert torch.equal(code[:8], want)
    assert torch.equal(code[8:], -want)
    # the rank->pattern trick maps sorted magnitudes to their bit patterns
    ranks = torch.arange(8)
    assert torch.equal(code[formats.fp4_rank_to_pattern(ranks)], want.sort().values)


@pytest.mark.skipif(not _extension.EXTENSION_LOADED, reason="compiled extension not built")
@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
def test_cpp_header_tables_equal_python(qt):
    table = torch.ops.qlora_kernels.format_table(qt)
    assert torch.equal(table[0], qk.get_4bit_code(qt))
    thr = formats.encode_thresholds(qt)
    assert torch.equal(table[1, : thr.numel()], thr)
    assert torch.isnan(table[1, thr.numel():]).all()


def test_fp8_map_sorted_finite_and_normalized():
    m = qk.fp8_e4m3_map()
    assert m.numel() == 256 and torch.isfinite(m).all()
    assert (m[1:] >= m[:-1]).all()
    assert m.min().item() == -1.0 and m.max().item() == 1.0
    # every finite E4M3 value appears (normalized by 448)
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = e4m3[torch.isfinite(e4m3)] / 448
    assert torch.isin(finite, m).all()


def test_dynamic_map_shape():
    signed, unsigned = qk.dynamic_map(True), qk.dynamic_map(False)
    for m in (signed, unsigned):
        assert m.numel() == 256 and (m[1:] >= m[:-1]).all() and m.max().item() == 1.0
    assert signed.min().item() < -0.99 and unsigned.min().item() == 0.0
    assert len(set(signed.tolist())) == 256


def test_bad_dq_code_rejected():
    with pytest.raises(ValueError, match="256"):
        formats.get_dq_code(torch.zeros(10))
    with pytest.raises(ValueError, match="sorted"):
        formats.get_dq_code(torch.rand(256) + torch.arange(256).flip(0))
    with pytest.raises(ValueError, match="dq_code"):
        formats.get_dq_code("fp16")


def test_dynamic_map_pinned_values():
    """Values worked out by hand from bitsandbytes' create_dynamic_map definition (7
    exponent bits: decade i = 0..6 holds the midpoints of linspace(0.1, 1, 2^i + 1) (signed)
    or linspace(0.1, 1, 2^(i+1) + 1) (unsigned), scaled by 10^(i-6); then 0 and 1.0; sorted),
    so they hold without bitsandbytes installed."""
    signed = qk.dynamic_map(signed=True)
    assert signed.dtype == torch.float32 and signed.shape == (256,)
    pins = {0: -0.99296875, 1: -0.97890625, 126: -5.5e-7, 127: 0.0, 128: 5.5e-7,
            129: 3.25e-6, 130: 7.75e-6, 253: 0.97890625, 254: 0.99296875, 255: 1.0}
    for i, v in pins.items():
        assert signed[i].item() == pytest.approx(v, rel=1e-6, abs=0.0), i
    # decade sizes 1, 2, 4, ..., 64 on each side: 10^-1 <= v < 1 holds 64 positive values
    assert int(((signed >= 0.1) & (signed < 1.0)).sum()) == 64
    unsigned = qk.dynamic_map(signed=False)
    pins = {0: 0.0, 1: 3.25e-7, 2: 7.75e-7, 254: 0.996484375, 255: 1.0}
    for i, v in pins.items():
        assert unsigned[i].item() == pytest.approx(v, rel=1e-6, abs=0.0), i
    assert int(((unsigned >= 0.1) & (unsigned < 1.0)).sum()) == 128
    assert bool((signed[1:] >= signed[:-1]).all()) and bool((unsigned[1:] > unsigned[:-1]).all())
