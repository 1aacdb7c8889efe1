"""QLoRALinear: initialisation, forward formula, gradients, dtypes, merge, memory of fwd+bwd."""
import math

import pytest
import torch

import qlora_kernels as qk


# tiny layers: intra-op threads only add waits on a loaded machine (see conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _linear(rng, n=48, k=96, bias=True, dtype=torch.float32):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=rng) * 0.1)
    return lin.to(dtype)


def _randomize_b(layer, rng, std=0.05):
    with torch.no_grad():
        b = torch.randn(layer.lora_B.weight.shape, generator=rng) * std
        layer.lora_B.weight.copy_(b)


@pytest.mark.parametrize("quantized", [True, False])
def test_fresh_wrapper_leaves_output_unchanged(quantized, rng):
    lin = _linear(rng)
    base = qk.Linear4bit.from_linear(lin) if quantized else lin
    x = torch.randn(3, 7, 96, generator=rng)
    want = base(x)
    layer = qk.QLoRALinear(base, r=8, lora_alpha=16)
    assert torch.equal(layer(x), want)
    assert not layer.lora_B.weight.any()
    # A is PEFT's default: Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
    a = layer.lora_A.weight
    assert a.shape == (8, 96) and a.abs().max() <= 1 / math.sqrt(96) and a.std() > 0.01
    torch.manual_seed(3)
    layer.reset_lora_parameters()
    torch.manual_seed(3)
    ref = torch.empty(8, 96)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    assert torch.equal(layer.lora_A.weight, ref)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_formula(use_rslora, rng):
    lin = _linear(rng)
    base = qk.Linear4bit.from_linear(lin)
    layer = qk.QLoRALinear(base, r=4, lora_alpha=12, use_rslora=use_rslora)
    _randomize_b(layer, rng)
    scale = 12 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scaling == pytest.approx(scale)
    x = torch.randn(5, 96, generator=rng)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    want = base(x) + scale * (x @ a.t() @ b.t())
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_adapter_dtype_default_and_float32(rng):
    base = qk.Linear4bit.from_linear(_linear(rng), compute_dtype=torch.bfloat16)
    layer = qk.QLoRALinear(base, r=4, lora_alpha=8)
    assert layer.lora_A.weight.dtype == torch.bfloat16 == layer.lora_B.weight.dtype
    layer32 = qk.QLoRALinear(qk.Linear4bit.from_linear(_linear(rng), compute_dtype=torch.bfloat16),
                             r=4, lora_alpha=8, adapter_dtype=torch.float32)
    assert layer32.lora_A.weight.dtype == torch.float32
    x = torch.randn(2, 96, generator=rng)
    assert layer(x).dtype == torch.float32 and layer32(x.bfloat16()).dtype == torch.bfloat16
    dense = qk.QLoRALinear(_linear(rng, dtype=torch.float16), r=2, lora_alpha=2)
    assert dense.lora_A.weight.dtype == torch.float16


def test_only_adapters_get_gradients(rng):
    layer = qk.QLoRALinear(qk.Linear4bit.from_linear(_linear(rng)), r=4, lora_alpha=8)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == \
        ["lora_A.weight", "lora_B.weight"]
    _randomize_b(layer, rng)
    x = torch.randn(6, 96, generator=rng, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.base_layer.bias.grad is None and layer.base_layer.weight.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dropout_only_on_adapter_path(rng):
    layer = qk.QLoRALinear(_linear(rng), r=4, lora_alpha=8, lora_dropout=0.5)
    x = torch.randn(4, 96, generator=rng)
    base_out = layer.base_layer(x)
    assert torch.equal(layer.train()(x), base_out)  # B = 0: nothing to drop yet
    _randomize_b(layer, rng)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_merge_dense_and_requantized(rng):
    base = qk.Linear4bit.from_linear(_linear(rng), compute_dtype=torch.bfloat16)
    layer = qk.QLoRALinear(base, r=4, lora_alpha=8, adapter_dtype=torch.float32)
    _randomize_b(layer, rng)
    x = torch.randn(5, 96, generator=rng)
    dense = layer.merge()
    assert type(dense) is torch.nn.Linear and dense.weight.dtype == torch.float32
    w = base.dequantize(torch.float32) + layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)
    torch.testing.assert_close(dense.weight, w)
    torch.testing.assert_close(dense(x), layer(x), rtol=2e-2, atol=2e-2)  # bf16 compute in layer
    q = layer.merge(requantize=True)
    assert isinstance(q, qk.Linear4bit) and q.quant_type == base.quant_type
    assert q.blocksize == base.blocksize and q.double_quant and q.compute_dtype == torch.bfloat16
    rel = ((q.dequantize(torch.float32) - w).norm() / w.norm()).item()
    assert rel < 0.12, rel
    assert not any(p.requires_grad for p in q.parameters())


def test_bad_arguments(rng):
    lin = _linear(rng)
    with pytest.raises(ValueError, match="r must be"):
        qk.QLoRALinear(lin, r=0, lora_alpha=1)
    with pytest.raises(ValueError, match="init"):
        qk.QLoRALinear(lin, r=2, lora_alpha=1, init="orthogonal")
    with pytest.raises(ValueError, match="lora_dropout"):
        qk.QLoRALinear(lin, r=2, lora_alpha=1, lora_dropout=1.5)
    with pytest.raises(TypeError, match="Conv1d"):
        qk.QLoRALinear(torch.nn.Conv1d(2, 2, 1), r=2, lora_alpha=1)


def test_fwd_bwd_keeps_no_dequantized_weight(rng):
    """4096x4096, r=64, 512 tokens: everything saved for backward is the packed weight and
    its state (already resident), x and A(x) - never a dense (out, in) weight."""
    n = k = 4096
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=rng)
    base = qk.Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    del lin
    layer = qk.QLoRALinear(base, r=64, lora_alpha=16)
    _randomize_b(layer, rng, std=0.01)
    x = torch.randn(512, k, generator=rng, dtype=torch.bfloat16, requires_grad=True)
    resident = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size(),
                      t.data_ptr() in resident))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.float().pow(2).mean().backward()
    assert layer.lora_A.weight.grad is not None and x.grad is not None
    assert all(s[0] != (n, k) for s in saved), saved
    extra = sum(s[2] for s in saved if not s[3])
    # x (bf16, 4 MiB) and A(x) (512 x 64 bf16) - the same as a LoRA over a dense layer
    assert extra <= x.numel() * 2 + 512 * 64 * 2 + 4096, (extra, saved)
    assert any(s[3] and s[1] == torch.uint8 for s in saved)  # the packed weight itself
