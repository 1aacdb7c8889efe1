"""QuantState dict interop, safetensors save/load, corrupt files, memory accounting."""
import json
import os

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.quant_state import pack_dict_to_tensor, unpack_tensor_to_dict


def _state(rng, shape=(333, 77), dtype=torch.bfloat16, **kw):
    w = (torch.randn(*shape, generator=rng)).to(dtype)
    return w, *qk.quantize_4bit(w, **kw)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_dict_round_trip(double_quant, qt, rng):
    _, packed, state = _state(rng, quant_type=qt, double_quant=double_quant)
    d = state.as_dict()
    expected = {"absmax", "quant_map", f"quant_state.bitsandbytes__{qt}"}
    if double_quant:
        expected |= {"nested_absmax", "nested_quant_map"}
    assert set(d) == expected
    meta = unpack_tensor_to_dict(d[f"quant_state.bitsandbytes__{qt}"])
    assert meta["quant_type"] == qt and meta["blocksize"] == 64
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [333, 77]
    if double_quant:
        assert meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"
        assert isinstance(meta["nested_offset"], float)
    state2 = qk.QuantState.from_dict(d, device="cpu")
    assert state2 == state
    assert torch.equal(qk.dequantize_4bit(packed, state2), qk.dequantize_4bit(packed, state))
    # the unpacked form and prefixed keys load too (as in a module's state_dict)
    assert qk.QuantState.from_dict(state.as_dict(packed=False)) == state
    prefixed = {f"model.layer.weight.{k}": v for k, v in d.items()}
    assert qk.QuantState.from_dict(prefixed) == state


def test_state_to_device_and_equality(rng):
    _, _, state = _state(rng)
    assert state.to("cpu") == state
    _, _, other = _state(rng)
    assert other != state


def test_from_dict_errors(rng):
    _, _, state = _state(rng)
    d = state.as_dict()
    with pytest.raises(ValueError, match="expected a packed"):
        qk.QuantState.from_dict({"absmax": d["absmax"]})
    bad = dict(d)
    bad["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="JSON is corrupt"):
        qk.QuantState.from_dict(bad)
    bad = dict(d)
    del bad["nested_quant_map"]
    with pytest.raises(ValueError, match="nested_quant_map"):
        qk.QuantState.from_dict(bad)
    bad = dict(d)
    bad["absmax"] = d["absmax"][:-1]
    with pytest.raises(ValueError, match="absmax"):
        qk.QuantState.from_dict(bad)
    bad = dict(d)
    bad["unexpected"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown quant state keys"):
        qk.QuantState.from_dict(bad)


def test_any_256_entry_table_works(rng):
    # a checkpoint may carry any sorted 8-bit table: use a uniform one
    table = torch.linspace(-1, 1, 256)
    w, packed, state = _state(rng, shape=(128, 64), dq_code=table)
    assert torch.equal(state.state2.code, table)
    err = (qk.dequantize_4bit(packed, state).float() - w.float()).abs().mean()
    assert err < 0.1
    assert qk.QuantState.from_dict(state.as_dict()) == state


def test_safetensors_round_trip(tmp_path, rng):
    _, p1, s1 = _state(rng)
    _, p2, s2 = _state(rng, shape=(64, 96), dtype=torch.float16, quant_type="fp4",
                       double_quant=False)
    bias = torch.randn(333, generator=rng)
    path = str(tmp_path / "model.safetensors")
    qk.save_quantized({"a.weight": (p1, s1), "b.weight": (p2, s2), "a.bias": bias}, path)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temp file left behind
    sd = qk.load_quantized(path)
    quantized, rest = qk.split_quantized(sd)
    assert set(quantized) == {"a.weight", "b.weight"} and set(rest) == {"a.bias"}
    assert torch.equal(rest["a.bias"], bias)
    for name, (p, s) in {"a.weight": (p1, s1), "b.weight": (p2, s2)}.items():
        lp, ls = quantized[name]
        assert torch.equal(lp, p) and ls == s
        assert torch.equal(qk.dequantize_4bit(lp, ls), qk.dequantize_4bit(p, s))


def _save_raw(path, tensors):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def test_corrupt_checkpoints_raise_naming_the_key(tmp_path, rng):
    _, p, s = _state(rng)
    path = str(tmp_path / "ok.safetensors")
    qk.save_quantized({"layer.weight": (p, s)}, path)
    flat = qk.load_quantized(path)

    # truncated file
    raw = open(path, "rb").read()
    trunc = str(tmp_path / "trunc.safetensors")
    open(trunc, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        qk.load_quantized(trunc)

    def variant(name, mutate):
        d = dict(flat)
        mutate(d)
        f = str(tmp_path / name)
        _save_raw(f, d)
        return f

    f = variant("missing.safetensors", lambda d: d.pop("layer.weight.absmax"))
    with pytest.raises(ValueError, match="layer.weight.absmax"):
        qk.load_quantized(f)
    f = variant("short.safetensors", lambda d: d.update({"layer.weight": d["layer.weight"][:-3]}))
    with pytest.raises(ValueError, match="layer.weight"):
        qk.load_quantized(f)
    f = variant("dtype.safetensors",
                lambda d: d.update({"layer.weight.absmax": d["layer.weight.absmax"].float()}))
    with pytest.raises(ValueError, match="layer.weight"):
        qk.load_quantized(f)
    f = variant("nopacked.safetensors", lambda d: d.pop("layer.weight"))
    with pytest.raises(ValueError, match="packed weight 'layer.weight' is missing"):
        qk.load_quantized(f)

    def bad_json(d):
        meta = unpack_tensor_to_dict(d["layer.weight.quant_state.bitsandbytes__nf4"])
        meta["shape"] = [10, 10]
        d["layer.weight.quant_state.bitsandbytes__nf4"] = pack_dict_to_tensor(meta)
    f = variant("json.safetensors", bad_json)
    with pytest.raises(ValueError, match="layer.weight"):
        qk.load_quantized(f)
    f = variant("orphan.safetensors",
                lambda d: d.pop("layer.weight.quant_state.bitsandbytes__nf4"))
    with pytest.raises(ValueError, match="no quant_state entry"):
        qk.load_quantized(f)
    with pytest.raises(FileNotFoundError):
        qk.load_quantized(str(tmp_path / "absent.safetensors"))


def test_bits_per_parameter(rng):
    w = torch.randn(4096, 4096, generator=rng)
    p, s = qk.quantize_4bit(w, blocksize=64)
    assert abs(qk.bits_per_parameter(p, s) - 4.127) <= 0.001
    p, s = qk.quantize_4bit(w, blocksize=64, double_quant=False)
    assert abs(qk.bits_per_parameter(p, s) - 4.5) <= 0.001


def test_estimate_memory_reproduces_qlora_figures():
    e65 = qk.estimate_memory(65e9)
    assert abs(e65.weights_nf4_dq_gb - 33.5) < 0.1 and abs(e65.weights_bf16_gb - 130) < 0.1
    for n, want in ((7e9, 3.6), (13e9, 6.7), (33e9, 17.0)):
        assert abs(qk.estimate_memory(n).weights_nf4_dq_gb - want) < 0.1
    assert 150e6 < qk.estimate_memory(7e9).lora_params < 170e6
    half = qk.estimate_memory(70e9, world_size=2)
    full = qk.estimate_memory(70e9)
    assert half.total_gb < full.total_gb


def test_bitsandbytes_state_dict_loads_here(rng):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(128, 64, generator=rng)
    try:
        packed, bstate = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                      compress_statistics=True)
    except Exception as exc:  # a bitsandbytes build without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize here: {exc}")
    ours = qk.QuantState.from_dict(bstate.as_dict(packed=True))
    theirs = bnb.functional.dequantize_4bit(packed, bstate)
    assert torch.allclose(qk.dequantize_4bit(packed, ours).float(), theirs.float(), atol=1e-6)
