"""The chunked LM-head loss: same loss and gradients as the unchunked head + transformers'
ForCausalLMLoss (float32, 1e-5 relative), labels shifted, ignore_index and
num_items_in_batch honoured, the full logits never built."""
import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk
from qlora_kernels.chunked_loss import chunked_causal_lm_loss, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("num_items", [None, 23])
def test_linear_cross_entropy_matches_unchunked(chunk, num_items, rng):
    t, hdim, v = 45, 24, 77
    h = torch.randn(t, hdim, generator=rng, requires_grad=True)
    w = torch.randn(v, hdim, generator=rng, requires_grad=True)
    labels = torch.randint(0, v, (t,), generator=rng)
    labels[::5] = -100
    loss = linear_cross_entropy(h, w, labels, num_items_in_batch=num_items, chunk=chunk)
    loss.backward(torch.tensor(1.7))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    red = "mean" if num_items is None else "sum"
    want = F.cross_entropy(h2 @ w2.T, labels, ignore_index=-100, reduction=red)
    if num_items is not None:
        want = want / num_items
    want.backward(torch.tensor(1.7))
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert _rel(h.grad, h2.grad) < 1e-5 and _rel(w.grad, w2.grad) < 1e-5
    assert h.grad[::5].abs().max() == 0  # ignored tokens get no gradient


def test_linear_cross_entropy_bad_shapes():
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))


def _llama(tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
def test_prepared_llama_same_loss_and_grads(tie, quantize, monkeypatch):
    monkeypatch.setattr(qk.chunked_loss, "CHUNK_ELEMENTS", 300 * 5)  # 5 tokens per chunk
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    grads, losses = [], []
    for chunked in (False, True):
        model = _llama(tie)
        qk.prepare_model(model, r=4, lora_alpha=8, quantize=quantize,
                         compute_dtype=torch.float32, verbose=False, chunked_loss=chunked)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, qk.QLoRALinear):
                    m.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert (out.logits is None) == chunked
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if chunked:  # calls without labels still return the logits
            assert model(input_ids=ids).logits.shape == (3, 11, 300)
    assert abs(losses[1].item() - losses[0].item()) <= 1e-5 * abs(losses[0].item())
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert _rel(grads[1][name], grads[0][name]) < 1e-5, name


def test_not_applied_to_other_models():
    assert not chunked_causal_lm_loss(torch.nn.Sequential(torch.nn.Linear(2, 2)))
