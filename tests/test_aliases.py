"""bitsandbytes' argument names (compress_statistics, quant_storage) and the deprecated
out_dtype= give the same results as ours."""
import warnings

import pytest
import torch

import qlora_kernels as qk


def test_compress_statistics_is_double_quant(rng):
    w = torch.randn(96, 64, generator=rng)
    for flag in (True, False):
        p, s = qk.quantize_4bit(w, compress_statistics=flag)
        p2, s2 = qk.quantize_4bit(w, double_quant=flag)
        assert s.nested == flag and torch.equal(p, p2) and s == s2
        lin = torch.nn.Linear(64, 96)
        assert qk.Linear4bit.from_linear(lin, compress_statistics=flag).double_quant == flag
        assert qk.Linear4bit(64, 96, compress_statistics=flag).double_quant == flag
    with pytest.raises(TypeError, match="disagree"):
        qk.quantize_4bit(w, double_quant=True, compress_statistics=False)
    m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), target_modules=["0"],
                         r=2, verbose=False, compress_statistics=False)
    assert not m[0].base_layer.double_quant


def test_quant_storage_round_trip(rng):
    w = torch.randn(33, 65, generator=rng)  # odd byte count: the storage view is padded
    packed, state = qk.quantize_4bit(w)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        stored, s = qk.quantize_4bit(w, quant_storage=dtype)
        assert stored.dtype == dtype
        assert torch.equal(qk.dequantize_4bit(stored, s), qk.dequantize_4bit(packed, state))


def test_out_dtype_is_a_deprecated_alias_of_dtype(rng):
    packed, state = qk.quantize_4bit(torch.randn(64, 64, generator=rng))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = qk.dequantize_4bit(packed, state, out_dtype=torch.float16)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert torch.equal(old, qk.dequantize_4bit(packed, state, dtype=torch.float16))
