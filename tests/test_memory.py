"""estimate_memory's model-specific terms (embedding and head kept in the compute dtype,
the LM head's loss, the backward's transients) against totals worked out by hand from
the shapes, and the paper accounting left as it was when they are not asked for."""
from types import SimpleNamespace

import pytest

import qlora_kernels as qk

# hidden 64, intermediate 192, 2 layers, 4 heads with 2 KV heads (k, v: 64 -> 32), vocab 320
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320)
# by hand: linears per layer 4096 (q) + 2048 (k) + 2048 (v) + 4096 (o) + 3 * 64 * 192 = 49152
LINEAR = 2 * 49152
NORMS = (2 * 2 + 1) * 64
# 4 bits + 8 / 64 (fp8 absmax) + 32 / (64 * 256) (nested float32 scale) = 4.126953125
BITS = 4.126953125
# LoRA r=8 per layer: q 64+64, o 64+64, k 64+32, v 64+32, gate 64+192, up 64+192, down 192+64
LORA = 8 * 2 * (128 + 128 + 96 + 96 + 256 + 256 + 256)


def _cfg(tied):
    return SimpleNamespace(tie_word_embeddings=tied, **TINY)


def test_untied_head_chunked_loss_by_hand():
    e = qk.estimate_memory(config=_cfg(False), r=8, seq_len=16)
    assert e.n_params == LINEAR + 2 * 320 * 64 + NORMS == 139584
    assert e.lora_params == LORA == 19456
    quantized = LINEAR + NORMS  # everything but the embedding and the head
    want = {
        "weights_nf4_dq_gb": quantized * BITS / 8,   # 50877.078125 bytes
        "embeddings_gb": 2 * 320 * 64 * 2,            # embedding + head in bf16
        "lora_weights_gb": LORA * 2, "lora_grads_gb": LORA * 2, "optimizer_gb": LORA * 8,
        "activations_gb": 16 * 64 * 2 * 2,            # checkpointed layer inputs
        # 16 tokens fit one chunk (2**23 // 320 = 26214 tokens): bf16 + fp32 logits, bf16 grad
        "loss_gb": 16 * 320 * (2 + 4 + 2),
        # one layer recomputed (16 x hidden per token, bf16) + the 192 x 64 weight in bf16
        "transient_gb": 16 * 64 * 16 * 2 + 192 * 64 * 2,
    }
    for field, nbytes in want.items():
        assert getattr(e, field) == pytest.approx(nbytes / 1e9, rel=1e-12), field
    assert e.total_gb == pytest.approx(468669.078125 / 1e9, rel=1e-12)


def test_tied_head_whole_logits_by_hand():
    e = qk.estimate_memory(config=_cfg(True), r=8, seq_len=32, chunked_loss=False)
    assert e.n_params == LINEAR + 320 * 64 + NORMS
    assert e.embeddings_gb == pytest.approx(320 * 64 * 2 / 1e9)  # one shared matrix
    # transformers' loss: bf16 logits, fp32 copy, fp32 log-softmax, fp32 grad, bf16 grad
    assert e.loss_gb == pytest.approx(32 * 320 * (2 + 4 + 4 + 4 + 2) / 1e9)
    total = (50877.078125 + 2 * LORA * 2 + LORA * 8 + 32 * 64 * 2 * 2 + 320 * 64 * 2
             + 32 * 320 * 16 + 32 * 64 * 16 * 2 + 192 * 64 * 2)
    assert total == 587453.078125
    assert e.total_gb == pytest.approx(total / 1e9, rel=1e-12)


def test_large_vocab_loss_is_one_chunk_not_the_batch():
    vocab = 2**20  # 2**23 // 2**20 = 8 tokens per chunk
    e = qk.estimate_memory(3e8, r=8, seq_len=512, shapes=(64, 192, 2, 0.5), vocab_size=vocab)
    assert e.loss_gb == pytest.approx(8 * vocab * 8 / 1e9)
    assert e.embeddings_gb == pytest.approx(2 * vocab * 64 * 2 / 1e9)
    assert e.weights_nf4_dq_gb == pytest.approx((3e8 - 2 * vocab * 64) * BITS / 8 / 1e9)


def test_vocab_size_arguments_equal_the_config():
    by_config = qk.estimate_memory(config=_cfg(False), r=8, seq_len=16)
    by_args = qk.estimate_memory(139584, r=8, seq_len=16, shapes=(64, 192, 2, 0.5),
                                 vocab_size=320)
    assert by_config == by_args


def test_without_vocab_size_the_paper_accounting_is_unchanged():
    e = qk.estimate_memory(7e9)
    assert e.embeddings_gb == e.loss_gb == e.transient_gb == 0.0
    assert e.weights_nf4_dq_gb == pytest.approx(7e9 * BITS / 8 / 1e9)
    assert e.total_gb == pytest.approx(e.weights_nf4_dq_gb + e.lora_weights_gb
                                       + e.lora_grads_gb + e.optimizer_gb + e.activations_gb)


@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=0), "vocab_size must be an integer >= 1"),
    (dict(vocab_size=True), "vocab_size must be an integer >= 1"),
    (dict(vocab_size=10**9), "must exceed the embedding and head"),
])
def test_bad_vocab_size(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.estimate_memory(1e9, **kwargs)
