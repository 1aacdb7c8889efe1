"""Selective gradient checkpointing (checkpointing.py): the same gradients as recomputing
everything, with the 4-bit GEMMs run once per step in the forward instead of twice."""
import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import qlora_kernels as qk
from qlora_kernels import checkpointing, matmul

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")]


def _prepared_llama(compute_dtype, selective, enable_first=False, adapter_dtype=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to(compute_dtype)
    if enable_first:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    qk.prepare_model(model, r=4, lora_alpha=8, compute_dtype=compute_dtype, verbose=False,
                     selective_checkpointing=selective, adapter_dtype=adapter_dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qk.QLoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    if not enable_first:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _step_counting_gemms(model, monkeypatch):
    """Gradients of one step and the number of forward GEMM calls (row tiles of W dequantized
    for x·Wᵀ) during the forward and during the backward (the recompute)."""
    calls = []
    real = matmul._dequantize_tiles
    monkeypatch.setattr(matmul, "_dequantize_tiles", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids).loss
    forward = len(calls)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, forward, len(calls) - forward


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("enable_first", [False, True])
def test_selective_same_gradients_without_recomputing_gemms(dtype, adapter_dtype, enable_first,
                                                            monkeypatch):
    # float32 adapters on a bf16 base: the unfused path (Linear4bit, then the adapter)
    monkeypatch.setenv("QLORA_KERNELS_GEMV_MAX_ROWS", "0")  # every matmul on the GEMM path
    full, fwd_full, bwd_full = _step_counting_gemms(
        _prepared_llama(dtype, False, adapter_dtype=adapter_dtype), monkeypatch)
    sel, fwd_sel, bwd_sel = _step_counting_gemms(
        _prepared_llama(dtype, True, enable_first, adapter_dtype), monkeypatch)
    assert fwd_full == fwd_sel == 14  # 2 blocks x 7 linears
    assert bwd_full == 14 and bwd_sel == 0  # the recompute reuses the kept outputs
    assert len(sel) == 28 and all(g.abs().sum() > 0 for g in sel.values())
    for name, g in full.items():
        assert torch.equal(sel[name], g), name  # the same values, kept instead of recomputed


def test_with_selective_policy_leaves_other_checkpointing_alone():
    mine = lambda: None  # noqa: E731
    for func in (functools.partial(checkpoint, use_reentrant=True),
                 functools.partial(checkpoint, use_reentrant=False, context_fn=mine), checkpoint):
        assert checkpointing.with_selective_policy(func) is func
    assert checkpointing.enable_selective_checkpointing(torch.nn.Sequential()) is False


def test_selective_policy_raises_if_a_kept_output_is_modified():
    # the guard that makes keeping outputs safe: an in-place write to one is an error
    packed, state = qk.quantize_4bit(torch.randn(32, 64))
    x = torch.randn(20, 64, requires_grad=True)

    def f(x):
        return qk.matmul_4bit(x, packed, state).mul_(2.0).sum()

    with pytest.raises(RuntimeError, match="mutated"):
        checkpoint(f, x, use_reentrant=False,
                   context_fn=checkpointing.selective_checkpoint_context).backward()


def test_prepare_model_selective_option():
    # "auto" (default): on for a CPU model; a bad value is refused before anything changes
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    for value, patched in (("auto", True), (True, True), (False, False)):
        model = transformers.LlamaForCausalLM(cfg)
        qk.prepare_model(model, r=2, verbose=False, selective_checkpointing=value)
        assert ("_set_gradient_checkpointing" in model.__dict__) is patched
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="selective_checkpointing"):
        qk.prepare_model(model, r=2, verbose=False, selective_checkpointing="yes")
    assert not any(isinstance(m, qk.QLoRALinear) for m in model.modules())


def test_estimate_memory_counts_what_selective_checkpointing_keeps():
    """estimate_memory's kept_outputs term against the values the policy actually keeps:
    the outputs of SAVED_OPS in one forward of a tiny LLaMA (GQA, so q and k/v differ)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qlora_kernels.memory import kept_outputs_per_token

    class CountSaved(TorchDispatchMode):
        values = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in checkpointing.SAVED_OPS:
                first = out[0] if isinstance(out, (tuple, list)) else out
                CountSaved.values += first.numel()
            return out

    model = _prepared_llama(torch.float32, selective=True)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), CountSaved():
        model(input_ids=ids)
    cfg = model.config
    shapes = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
              cfg.num_key_value_heads / cfg.num_attention_heads)
    assert CountSaved.values == ids.numel() * cfg.num_hidden_layers * kept_outputs_per_token(shapes)
