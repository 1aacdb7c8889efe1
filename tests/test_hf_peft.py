"""PEFT LoRA over qlora_kernels' Linear4bit (qlora_kernels.hf.peft_dispatch), tiny Llama."""
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
import qlora_kernels as qk  # noqa: E402
import qlora_kernels.hf as qkhf  # noqa: E402

from hf_tiny import (LAYERS, LINEARS_PER_LAYER, import_peft_with_shim, load_quantized,  # noqa: E402
                     save_tiny_llama, tokens)
peft = import_peft_with_shim()

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _lora_config(**kw):
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear",
          "task_type": "CAUSAL_LM", **kw}
    return peft.LoraConfig(**kw)


def _peft_model(checkpoint, seed=3, **kw):
    model = peft.get_peft_model(load_quantized(checkpoint, **kw), _lora_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _wrapped(model):
    cls = qkhf.lora_linear4bit_class()
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def _lora_tensors(model):
    return {n.replace(".default", ""): p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_all_linear_wraps_every_linear4bit(checkpoint):
    model = _peft_model(checkpoint)
    wrapped = _wrapped(model)
    assert len(wrapped) == LAYERS * LINEARS_PER_LAYER
    assert all(isinstance(m.get_base_layer(), qk.Linear4bit) for m in wrapped.values())
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_forward_is_the_4bit_base_plus_the_lora_term(checkpoint, rng):
    model = _peft_model(checkpoint)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, generator=rng)
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = torch.nn.functional.linear(x, base.dequantize(torch.float32)) + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_backward_reaches_only_the_adapters(checkpoint):
    model = _peft_model(checkpoint)
    packed = {n: m.get_base_layer().packed_weight.clone() for n, m in _wrapped(model).items()}
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, m in _wrapped(model).items():
        assert torch.equal(m.get_base_layer().packed_weight, packed[n])


def test_prepare_model_for_kbit_training_keeps_it_working(checkpoint):
    q = peft.prepare_model_for_kbit_training(load_quantized(checkpoint, dtype=torch.bfloat16,
                                                            compute_dtype=torch.bfloat16))
    lin = q.model.layers[0].self_attn.q_proj
    assert isinstance(lin, qk.Linear4bit) and lin.weight.dtype == torch.uint8
    model = peft.get_peft_model(q, _lora_config())
    assert len(_wrapped(model)) == LAYERS * LINEARS_PER_LAYER
    model.train()
    x = tokens()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_peft_save_and_from_pretrained_round_trip(checkpoint, tmp_path):
    model = _peft_model(checkpoint)
    model.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(load_quantized(checkpoint), tmp_path)
    a, b = _lora_tensors(model), _lora_tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)


def test_adapters_move_between_peft_and_qk_both_ways(checkpoint, tmp_path):
    model = _peft_model(checkpoint)
    model.save_pretrained(tmp_path / "peft")
    # PEFT -> qk.load_adapter: the same tensors in the same layers
    ours = qk.load_adapter(load_quantized(checkpoint), str(tmp_path / "peft"),
                           compute_dtype=torch.float32)
    peft_tensors = {k.removeprefix("base_model.model."): v for k, v in _lora_tensors(model).items()}
    qk_tensors = {n: p.detach() for n, p in ours.named_parameters() if "lora_" in n}
    assert peft_tensors.keys() == qk_tensors.keys()
    assert all(torch.equal(peft_tensors[k], qk_tensors[k]) for k in qk_tensors)
    x = tokens()
    with torch.no_grad():
        ref = model(input_ids=x).logits
        torch.testing.assert_close(ours(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)
    # qk.save_adapter -> PeftModel.from_pretrained
    qk.save_adapter(ours, str(tmp_path / "qk"))
    back = peft.PeftModel.from_pretrained(load_quantized(checkpoint), str(tmp_path / "qk"))
    a, b = _lora_tensors(model), _lora_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, ref)


@pytest.mark.parametrize("dtype, compute_dtype", [(torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16)])
def test_merge_and_unload_gives_a_dense_model_in_the_model_dtype(checkpoint, dtype, compute_dtype):
    model = _peft_model(checkpoint, dtype=dtype, compute_dtype=compute_dtype)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    base = layer.get_base_layer()
    expected = base.dequantize(torch.float32) + layer.get_delta_weight("default").float()
    x = tokens()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    merged = model.merge_and_unload()
    v = merged.model.layers[0].self_attn.v_proj
    assert type(v) is torch.nn.Linear and v.weight.dtype == dtype
    assert torch.equal(v.weight, expected.to(dtype))  # one rounding, no re-quantization
    assert not any(isinstance(m, qk.Linear4bit) for m in merged.modules())
    tol = 1e-4 if compute_dtype == dtype == torch.float32 else 0.1
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits.float(), ref.float(), atol=tol, rtol=tol)


def test_unmerge_restores_the_4bit_layer(checkpoint):
    model = _peft_model(checkpoint)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    base = layer.get_base_layer()
    x = tokens()
    with torch.no_grad():
        ref = model(input_ids=x).logits
        layer.merge()
        assert type(layer.get_base_layer()) is torch.nn.Linear and layer.merged
        torch.testing.assert_close(model(input_ids=x).logits, ref, atol=1e-4, rtol=1e-4)
        layer.unmerge()
        assert layer.get_base_layer() is base and not layer.merged
        assert torch.equal(model(input_ids=x).logits, ref)


def test_dora_is_refused(checkpoint):
    with pytest.raises(ValueError, match="plain LoRA only"):
        peft.get_peft_model(load_quantized(checkpoint), _lora_config(use_dora=True))


def test_unknown_peft_version_is_refused(monkeypatch):
    from peft.tuners.lora import model as lora_model
    wrapper = lora_model.LoraModel._create_new_module
    monkeypatch.setattr(lora_model.LoraModel, "_create_new_module",
                        staticmethod(wrapper.__wrapped__))
    monkeypatch.setattr(peft, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="peft 0.99.0 is not a version .*register_with"):
        qkhf.install_peft_shim()


def test_register_with_works_without_the_shim(checkpoint):
    code = f"""
import torch, peft, qlora_kernels as qk, qlora_kernels.hf as qkhf
from peft.tuners.lora import model as lora_model
assert not qkhf.PEFT_SHIM_INSTALLED
assert not hasattr(lora_model.LoraModel._create_new_module, '_qlora_kernels')
from hf_tiny import load_quantized
base = load_quantized({checkpoint!r})
cfg = qkhf.register_with(peft.LoraConfig(r=2, target_modules='all-linear'), base)
m = peft.get_peft_model(base, cfg)
cls = qkhf.lora_linear4bit_class()
print(sum(isinstance(x, cls) for x in m.modules()))
"""
    env = dict(os.environ, QLORA_KERNELS_NO_PEFT_SHIM="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                           os.path.dirname(os.path.dirname(__file__))]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(LAYERS * LINEARS_PER_LAYER)
