"""No silent garbage (issue 20): validated loads, all-or-nothing conversion, one behaviour
per input on every path and backend, and the edges (0 features, 0-d x, huge weights)."""
import json
import math
import os

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.quant_state import pack_dict_to_tensor, unpack_tensor_to_dict
from qlora_kernels.serialization import flatten_quantized

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _entry(rng, shape=(64, 96), double_quant=True):
    packed, state = qk.quantize_4bit(torch.randn(*shape, generator=rng), double_quant=double_quant)
    return flatten_quantized({"w": (packed, state)})


def _with_meta(flat, **changes):
    key = next(k for k in flat if ".quant_state." in k)
    meta = unpack_tensor_to_dict(flat[key])
    meta.update(changes)
    return {**flat, key: pack_dict_to_tensor(meta)}


def _save(tmp_path, flat):
    from safetensors.torch import save_file
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous().clone() for k, v in flat.items()}, path)
    return path


# ------------------------------------------------------------------ item 3: prepare_model
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_prepare_model_names_the_bad_layer_and_converts_nothing(bad):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        m[1].weight[3, 5] = bad
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="layer '1'"):
        qk.prepare_model(m, verbose=False)
    assert all(type(x) is torch.nn.Linear for x in m)
    assert all(p.requires_grad for p in m.parameters())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k], ) or k == "1.weight" for k in before)


def test_prepare_model_checks_arguments_before_converting():
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    for kwargs in ({"blocksize": 48}, {"quant_type": "nf5"}, {"r": 0},
                   {"compute_dtype": torch.int8}, {"lora_dropout": 1.5}):
        with pytest.raises((ValueError, TypeError)):
            qk.prepare_model(m, verbose=False, **kwargs)
        assert all(type(x) is torch.nn.Linear for x in m)


# ------------------------------------------------------------------ item 4: load_quantized
@pytest.mark.parametrize("key", ["absmax", "nested_absmax", "quant_map", "nested_quant_map"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_load_quantized_rejects_bad_values(tmp_path, rng, key, value):
    double = key != "absmax"
    flat = _entry(rng, double_quant=double)
    if key == "quant_map" and value == -1.0:
        pytest.skip("the 4-bit maps hold negative codes by design")
    if key == "nested_quant_map" and value == -1.0:
        pytest.skip("the signed 8-bit maps hold negative codes by design")
    t = flat[f"w.{key}"].clone()
    t.view(-1)[t.numel() // 2] = value
    path = _save(tmp_path, {**flat, f"w.{key}": t})
    with pytest.raises(ValueError, match=rf"w\.safetensors.*'w'.*{key}"):
        qk.load_quantized(path)


@pytest.mark.parametrize("offset", [float("nan"), 1e30, float("inf"), -0.5])
def test_load_quantized_rejects_a_bad_nested_offset(tmp_path, rng, offset):
    flat = _with_meta(_entry(rng), nested_offset=offset)
    with pytest.raises(ValueError, match="nested_offset"):
        qk.load_quantized(_save(tmp_path, flat))


@pytest.mark.parametrize("change, what", [
    ({"blocksize": 0}, "blocksize"), ({"blocksize": 1e400}, "blocksize"),
    ({"blocksize": "64"}, "blocksize"), ({"blocksize": 48}, "blocksize"),
    ({"shape": [-64, -96]}, "shape"), ({"shape": [2 ** 40, 2 ** 40]}, "shape"),
    ({"shape": "64x96"}, "shape"), ({"dtype": "float64"}, "dtype"), ({"dtype": "int32"}, "dtype"),
    ({"dtype": 5}, "dtype"), ({"nested_blocksize": 128}, "nested_blocksize"),
    ({"nested_dtype": "float16"}, "nested_dtype"), ({"quant_type": "fp4"}, "quant_type"),
])
def test_load_quantized_rejects_bad_json_fields(tmp_path, rng, change, what):
    with pytest.raises(ValueError, match=what):
        qk.load_quantized(_save(tmp_path, _with_meta(_entry(rng), **change)))


@pytest.mark.parametrize("blob", [b"5", b"null", b"[1, 2]", b'"x"', b"\xff\xfe"])
def test_load_quantized_rejects_a_json_blob_that_is_no_object(tmp_path, rng, blob):
    flat = _entry(rng)
    key = next(k for k in flat if ".quant_state." in k)
    flat[key] = torch.tensor(list(blob), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"w\.safetensors.*quant_state"):
        qk.load_quantized(_save(tmp_path, flat))


def test_load_quantized_rejects_two_states_for_one_weight(tmp_path, rng):
    flat = _entry(rng)
    key = next(k for k in flat if ".quant_state." in k)
    meta = unpack_tensor_to_dict(flat[key])
    flat[key.replace("nf4", "fp4")] = pack_dict_to_tensor({**meta, "quant_type": "fp4"})
    with pytest.raises(ValueError, match="second quant_state"):
        qk.load_quantized(_save(tmp_path, flat))


def test_load_quantized_rejects_nan_in_a_plain_tensor(tmp_path, rng):
    flat = {**_entry(rng), "bias": torch.tensor([0.0, float("nan")])}
    with pytest.raises(ValueError, match="'bias'"):
        qk.load_quantized(_save(tmp_path, flat))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_load_quantized_on_cuda_without_cuda_says_so(tmp_path, rng):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        qk.load_quantized(_save(tmp_path, _entry(rng)), device="cuda")


def test_load_quantized_accepts_the_real_thing(tmp_path, rng):
    flat = _entry(rng)
    sd = qk.load_quantized(_save(tmp_path, flat))
    assert all(torch.equal(sd[k], flat[k]) for k in flat)


# ------------------------------------------------------------------ item 5: offset=None
def test_nested_state_without_offset_fails_validate(rng):
    packed, state = qk.quantize_4bit(torch.randn(64, 64, generator=rng))
    state.offset = None
    with pytest.raises(ValueError, match="nested_offset"):
        state.validate(packed)
    with pytest.raises(ValueError, match="nested_offset"):
        qk.dequantize_4bit(packed, state)


# ------------------------------------------------------------------ item 6: float64 / int bias
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_float64_x_and_integer_bias_behave_the_same_at_every_batch_size(rng, rows):
    packed, state = qk.quantize_4bit(torch.randn(48, 64, generator=rng))
    x = torch.randn(rows, 64, generator=rng)
    with pytest.raises(TypeError, match="float64"):
        qk.matmul_4bit(x.double(), packed, state)
    with pytest.raises(TypeError, match="bias.*int64"):
        qk.matmul_4bit(x, packed, state, torch.arange(48))
    with pytest.raises(TypeError, match="float64"):
        torch.ops.qlora_kernels.matmul_4bit(x.double(), packed, state.absmax, state.code, 64, 48,
                                            state.state2.absmax, state.state2.code,
                                            state.offset, None)
    lin = qk.Linear4bit(64, 48)
    with pytest.raises(TypeError, match="float64"):
        lin(x.double())
    # with a compute dtype, x is cast to it (documented), so float64 works at every size
    lin.compute_dtype = torch.float32
    y = lin(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, lin(x).double())


# ------------------------------------------------------------------ item 10: every backend
@pytest.mark.parametrize("backend", qk.available_backends("cpu"))
def test_integer_output_dtype_is_refused_on_every_backend(rng, backend):
    packed, state = qk.quantize_4bit(torch.randn(64, 64, generator=rng))
    with pytest.raises(TypeError, match="int32"):
        qk.dequantize_4bit(packed, state, out_dtype=torch.int32, backend=backend)
    q, absmax = qk.quantize_blockwise(torch.randn(300, generator=rng))
    with pytest.raises(TypeError, match="int16"):
        qk.dequantize_blockwise(q, absmax, dtype=torch.int16, backend=backend)


def test_reference_ops_refuse_what_the_compiled_ops_refuse(rng):
    from qlora_kernels.backends import reference as ref
    from qlora_kernels.backends.reference import adamw as reference
    packed, state = qk.quantize_4bit(torch.randn(64, 64, generator=rng), double_quant=False)
    ops = [ref.dequantize_4bit]
    if qk.EXTENSION_LOADED:
        ops.append(torch.ops.qlora_kernels.dequantize_4bit)
    for op in ops:
        with pytest.raises((TypeError, RuntimeError), match="dtype"):
            op(packed, state.absmax, state.code, 64, 4096, torch.int32)
    p, g = torch.randn(300, generator=rng), torch.randn(300, generator=rng)
    fns = [reference.adamw_step_]
    if qk.EXTENSION_LOADED:
        fns.append(torch.ops.qlora_kernels.adamw_step_)
    for fn in fns:
        m, v = torch.zeros(300), torch.zeros(300)
        with pytest.raises((ValueError, RuntimeError), match="lr"):
            fn(p, g, m, v, -1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
        with pytest.raises((TypeError, RuntimeError)):
            fn(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.5, False)
        with pytest.raises((ValueError, RuntimeError), match="beta1"):
            fn(p, g, m, v, 1e-3, 1.0, 0.999, 1e-8, 0.0, 1, False)
        assert not m.any() and not v.any()


@pytest.mark.parametrize("backend", ["torch", None])
def test_negative_lr_set_after_construction_is_refused(rng, backend):
    w = torch.nn.Parameter(torch.randn(300, generator=rng))
    opt = qk.optim.AdamW([w], lr=1e-3, backend=backend)
    w.grad = torch.randn(300, generator=rng)
    opt.param_groups[0]["lr"] = -1e-3
    before = w.detach().clone()
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert torch.equal(w.detach(), before) and not opt.state[w]


# ------------------------------------------------------------------ item 11: edges
@pytest.mark.parametrize("n_in, n_out", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("rows", [1, 40])
def test_linear4bit_with_zero_features_works_like_nn_linear(rng, n_in, n_out, rows):
    lin = qk.Linear4bit(n_in, n_out)
    ref = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        ref.bias.copy_(lin.bias)
    x = torch.randn(rows, n_in, generator=rng, requires_grad=True)
    y = lin(x)
    torch.testing.assert_close(y, ref(x))
    y.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    assert lin.bias.grad is not None and torch.equal(lin.bias.grad, torch.full((n_out,), rows * 1.0))


def test_zero_dim_x_gives_a_clear_error(rng):
    packed, state = qk.quantize_4bit(torch.randn(8, 8, generator=rng))
    with pytest.raises(ValueError, match="0-d"):
        qk.matmul_4bit(torch.tensor(1.0), packed, state)
    with pytest.raises(ValueError, match=r"shape \(\)"):
        qk.Linear4bit(8, 8)(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.bool])
def test_linear4bit_refuses_a_non_float_compute_dtype_at_construction(dtype):
    with pytest.raises(ValueError, match="compute_dtype"):
        qk.Linear4bit(8, 8, compute_dtype=dtype)
    with pytest.raises(ValueError, match="compute_dtype"):
        qk.Linear4bit.from_linear(torch.nn.Linear(8, 8), compute_dtype=dtype)


def test_double_quantization_of_weights_near_float32_max(rng):
    w = torch.rand(64, 256, generator=rng) * 3.0e38  # finite; their absmax mean overflows
    w[::2] *= -1
    packed, state = qk.quantize_4bit(w)
    assert math.isfinite(state.offset)
    out = qk.dequantize_4bit(packed, state)
    assert torch.isfinite(out).all()
    assert (out - w).abs().max() / w.abs().max() < 0.2  # 4-bit accuracy, no overflow


# ------------------------------------------------------------------ fuzz
def _corrupt(data, flat):
    """One random corruption of an entry: a tensor value, dtype or length, or a JSON field."""
    key = data.draw(st.sampled_from(sorted(flat)))
    t = flat[key]
    if ".quant_state." in key:
        meta = unpack_tensor_to_dict(t)
        field = data.draw(st.sampled_from(sorted(meta)))
        meta[field] = data.draw(st.one_of(
            st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
            st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
            st.lists(st.integers(-3, 2 ** 33), max_size=3)))
        return {**flat, key: pack_dict_to_tensor(meta)}
    how = data.draw(st.sampled_from(["value", "dtype", "shorter", "longer"]))
    if how == "value" and t.is_floating_point():
        t = t.clone()
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 1e38]))
    elif how == "dtype":
        t = t.to(data.draw(st.sampled_from([torch.float64, torch.int32, torch.float16,
                                            torch.uint8, torch.float32])))
    elif how == "shorter" and t.numel() > 1:
        t = t.reshape(-1)[:-1]
    elif how == "longer":
        t = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    return {**flat, key: t}


def _plausible(state, packed):
    """What a loaded entry must satisfy: it dequantizes to finite values."""
    return bool(torch.isfinite(qk.dequantize_4bit(packed, state)).all())


@FUZZ
@given(data=st.data())
def test_fuzz_quant_state_from_dict(data):
    rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    flat = _entry(rng, shape=(data.draw(st.integers(1, 9)), data.draw(st.integers(1, 70))),
                  double_quant=data.draw(st.booleans()))
    bad = _corrupt(data, flat)
    parts = {k: v for k, v in bad.items() if k != "w"}
    try:
        state = qk.QuantState.from_dict(parts)
        state.validate(bad["w"])
    except ValueError:
        return
    assert _plausible(state, bad["w"])


@FUZZ
@given(data=st.data())
def test_fuzz_load_quantized(tmp_path_factory, data):
    rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    flat = _entry(rng, shape=(data.draw(st.integers(1, 9)), data.draw(st.integers(1, 70))),
                  double_quant=data.draw(st.booleans()))
    bad = _corrupt(data, flat)
    path = _save(tmp_path_factory.mktemp("fuzz"), bad)
    if data.draw(st.booleans()):  # and/or damage the file's bytes
        raw = bytearray(open(path, "rb").read())
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
        open(path, "wb").write(bytes(raw))
    try:
        sd = qk.load_quantized(path)
    except ValueError as exc:
        assert os.path.basename(path) in str(exc)
        return
    quantized, _ = qk.split_quantized(sd)
    for packed, state in quantized.values():
        assert _plausible(state, packed)
