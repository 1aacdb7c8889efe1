"""Linear4bit: construction, forward/backward, device moves, copies, state_dict layout."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk


def _pair(rng, n=77, k=333, **kw):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) * 0.05)
    return lin, qk.Linear4bit.from_linear(lin, **kw)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16])
def test_forward_close_to_dense(compute_dtype, rng):
    lin, l4 = _pair(rng, compute_dtype=compute_dtype)
    x = torch.randn(3, 5, 333, generator=rng)
    y = l4(x)
    assert y.shape == (3, 5, 77) and y.dtype == torch.float32
    w_hat = l4.dequantize(torch.float32)
    want = F.linear(x, w_hat, lin.bias)
    tol = 2e-2 if compute_dtype == torch.bfloat16 else 1e-4
    assert ((y - want).abs().max() / want.abs().max()).item() < tol
    # and the quantization error against the unquantized layer is what NF4 gives
    rel = ((y - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.15, rel


def test_backward_reaches_input_and_bias_only(rng):
    _, l4 = _pair(rng)
    x = torch.randn(4, 333, generator=rng, requires_grad=True)
    l4(x).pow(2).sum().backward()
    assert x.grad is not None and l4.bias.grad is not None
    assert l4.weight.grad is None and not l4.weight.requires_grad
    assert [n for n, p in l4.named_parameters() if p.requires_grad] == ["bias"]


def test_constructor_from_shapes():
    l4 = qk.Linear4bit(256, 128, bias=False, quant_type="fp4", blocksize=128, double_quant=False)
    assert l4.weight.shape == (256 * 128 // 2, 1) and l4.weight.dtype == torch.uint8
    assert l4.bias is None and l4.quant_type == "fp4" and l4.blocksize == 128
    assert l4(torch.randn(2, 256)).shape == (2, 128)
    r = repr(l4)
    assert "in_features=256" in r and "quant_type=fp4" in r and "double_quant=False" in r


def test_dtype_cast_does_not_touch_the_quantized_state(rng):
    _, l4 = _pair(rng)
    x = torch.randn(2, 333, generator=rng)
    before = l4(x)
    absmax, nested = l4.absmax.clone(), l4.nested_absmax.clone()
    l4.to(torch.bfloat16)
    assert l4.weight.dtype == torch.uint8 and l4.nested_absmax.dtype == torch.float32
    assert torch.equal(l4.absmax, absmax) and torch.equal(l4.nested_absmax, nested)
    assert l4.bias.dtype == torch.bfloat16
    l4.float().cpu()
    assert torch.allclose(l4(x), before, atol=1e-2)


def test_deepcopy_and_pickle(rng):
    _, l4 = _pair(rng)
    x = torch.randn(3, 333, generator=rng)
    for clone in (copy.deepcopy(l4), pickle.loads(pickle.dumps(l4))):
        assert torch.equal(clone(x), l4(x))
        assert clone.weight.data_ptr() != l4.weight.data_ptr()
    buf = io.BytesIO()
    torch.save(l4, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), l4(x))


def test_state_dict_in_bitsandbytes_layout(rng):
    _, l4 = _pair(rng, compute_dtype=torch.float32)
    sd = l4.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"}
    assert sd["weight"].dtype == torch.uint8 and sd["weight.absmax"].dtype == torch.uint8
    other = qk.Linear4bit(333, 77, compute_dtype=torch.float32, double_quant=False, quant_type="fp4")
    other.load_state_dict(sd)  # the state (incl. nested/non-nested, quant type) comes along
    x = torch.randn(2, 333, generator=rng)
    assert torch.equal(other(x), l4(x))
    assert other.quant_type == "nf4" and other.double_quant


def test_load_into_a_model_from_a_saved_file(tmp_path, rng):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    q = torch.nn.Sequential(qk.Linear4bit.from_linear(model[0]), torch.nn.ReLU(),
                            qk.Linear4bit.from_linear(model[2]))
    path = str(tmp_path / "model.safetensors")
    qk.save_quantized(q, path)
    fresh = torch.nn.Sequential(qk.Linear4bit(64, 32), torch.nn.ReLU(), qk.Linear4bit(32, 8))
    fresh.load_state_dict(qk.load_quantized(path))
    x = torch.randn(5, 64, generator=rng)
    assert torch.equal(fresh(x), q(x))


def test_load_errors_name_the_key(rng):
    _, l4 = _pair(rng)
    sd = l4.state_dict()
    wrong = qk.Linear4bit(333, 78)
    with pytest.raises(RuntimeError, match="weight.*does not match the layer"):
        wrong.load_state_dict(sd)
    missing = {k: v for k, v in sd.items() if k != "weight.quant_map"}
    with pytest.raises(RuntimeError, match="weight.*quant_map"):
        qk.Linear4bit(333, 77).load_state_dict(missing)
    with pytest.raises(RuntimeError, match="weight"):
        qk.Linear4bit(333, 77).load_state_dict({"bias": sd["bias"]})


def test_bad_input(rng):
    _, l4 = _pair(rng)
    with pytest.raises(ValueError, match="last dimension 300"):
        l4(torch.randn(2, 300))
    with pytest.raises(TypeError, match="floating point"):
        l4(torch.ones(2, 333, dtype=torch.int64))
    with pytest.raises(TypeError, match="nn.Linear"):
        qk.Linear4bit.from_linear(torch.nn.Conv1d(3, 3, 1))


@pytest.mark.gpu
def test_cuda_move_and_forward(rng):
    lin, l4 = _pair(rng, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 333, generator=rng)
    cpu_out = l4(x)
    l4.cuda()
    assert l4.weight.is_cuda and l4.absmax.is_cuda and l4.nested_absmax.is_cuda
    assert torch.allclose(l4(x.cuda()).cpu(), cpu_out, atol=2e-2, rtol=2e-2)
    l4.cpu()
    assert not l4.absmax.is_cuda
