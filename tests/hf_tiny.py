"""A tiny ``LlamaForCausalLM`` checkpoint built from a config (no download), shared by the
tests of qlora_kernels.hf (test_hf_*.py). Imported only after pytest.importorskip."""
import torch

HIDDEN, INTER, LAYERS, VOCAB = 64, 96, 2, 128
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def tiny_llama(seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # fresh random weights everywhere (no zero or constant tensor)
        for p in model.parameters():
            if p.dim() == 1:  # norm scales near 1, else the logits are flat
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.08)
    return model


def save_tiny_llama(path, seed: int = 0, dtype=torch.float32) -> str:
    tiny_llama(seed).to(dtype).save_pretrained(path)
    return str(path)


def load_quantized(path, **config):
    import transformers
    import qlora_kernels.hf as qkhf
    dtype = config.pop("dtype", torch.float32)
    config.setdefault("compute_dtype", torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qkhf.QuantizationConfig(**config), dtype=dtype)


def tokens(seed: int = 1, batch: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
