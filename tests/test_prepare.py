"""prepare_model / merge_lora / save_adapter / load_adapter on an MLP and a tiny Llama."""
import copy
import json
import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import qlora_kernels as qk
from qlora_kernels.adapters import CONFIG_NAME, WEIGHTS_NAME
from qlora_kernels.compute_dtype import resolve_compute_dtype


# tiny layers: intra-op threads only add waits on a loaded machine (see conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                               torch.nn.GELU(), torch.nn.Linear(128, 32))


def _llama(seed=0, tie=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomize_lora(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qk.QLoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 4, 8, 15, 16, 23, 42, 127]])


# ------------------------------------------------------------------------------- MLP
def test_mlp_conversion_output_and_summary(capsys):
    mlp = _mlp()
    ref = copy.deepcopy(mlp)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    out = qk.prepare_model(mlp, r=4, lora_alpha=8, compute_dtype=torch.bfloat16)
    assert out is mlp
    line = capsys.readouterr().out.strip()
    lora = 4 * (64 + 128) + 4 * (128 + 128) + 4 * (128 + 32)
    total = sum(p.numel() for p in ref.parameters()) + lora
    assert line.startswith(f"trainable params: {lora:,} || all params: {total:,} || trainable%: ")
    assert "MiB ->" in line and "\n" not in line
    # "all-linear" on a plain MLP: no head detected, every Linear converted
    assert all(isinstance(mlp[i], qk.QLoRALinear) and isinstance(mlp[i].base_layer, qk.Linear4bit)
               for i in (0, 2, 4))
    # equal to the unconverted model with the dequantized weights, up to bf16 compute...
    deq = copy.deepcopy(ref)
    with torch.no_grad():
        for i in (0, 2, 4):
            deq[i].weight.copy_(mlp[i].base_layer.dequantize(torch.float32))
    assert _rel(mlp(x), deq(x)) < 1e-2
    # ...and to the original within NF4's error (uniform-initialised weights: ~5% per layer)
    assert _rel(mlp(x), ref(x)) < 0.25


def test_mlp_one_step_changes_only_lora():
    mlp = qk.prepare_model(_mlp(), r=4, lora_alpha=8, verbose=False)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    opt = torch.optim.AdamW([p for p in mlp.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    mlp(x).pow(2).mean().backward()
    opt.step()
    changed = {k for k, v in mlp.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(".lora_A." in k or ".lora_B." in k for k in changed), changed
    assert {f"{i}.lora_B.weight" for i in (0, 2, 4)} <= changed


def test_target_selection_list_regex_and_errors():
    m = qk.prepare_model(_mlp(), target_modules=["2"], r=2, verbose=False)
    assert isinstance(m[2], qk.QLoRALinear) and type(m[0]) is torch.nn.Linear
    m = qk.prepare_model(_mlp(), target_modules=r"[04]", r=2, verbose=False)
    assert isinstance(m[0], qk.QLoRALinear) and type(m[2]) is torch.nn.Linear
    with pytest.raises(ValueError, match=r"matched no linear layer.*'0', '2', '4'"):
        qk.prepare_model(_mlp(), target_modules=["q_proj"], verbose=False)
    with pytest.raises(ValueError, match="not a valid regex"):
        qk.prepare_model(_mlp(), target_modules="(", verbose=False)
    with pytest.raises(ValueError, match="already QLoRALinear"):
        qk.prepare_model(m, target_modules=["0", "4"], verbose=False)


def test_saved_target_modules_select_exactly_the_adapted_layers(tmp_path):
    def nested():
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
                                     for _ in range(2)))
    m = qk.prepare_model(nested(), target_modules=["0.1"], r=2, verbose=False)
    _randomize_lora(m)
    qk.save_adapter(m, str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["target_modules"] == r"(0\.1)"  # the suffix "1" would also select "1.1"
    fresh = qk.load_adapter(nested(), str(tmp_path))
    assert sorted(qk.prepare.lora_layers(fresh)) == ["0.1"]
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_conversion_is_layer_by_layer():
    """Allocation trace of prepare_model: the peak of new allocations stays far below a
    second copy of the model, and each dense weight is freed as soon as its layer is
    converted (the i-th weight dies when i layers are converted)."""
    import sys
    import weakref
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.bench_lora import allocation_trace
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(256, 256, bias=False) for _ in range(8)))
    dense = qk.prepare.weight_bytes(model)
    deaths = []
    for lin in model:
        weakref.finalize(lin.weight, lambda: deaths.append(len(qk.prepare.lora_layers(model))))
    del lin
    _, peak, _ = allocation_trace(
        lambda: qk.prepare_model(model, r=2, compute_dtype=None, verbose=False))
    assert peak < 0.4 * dense, (peak, dense)  # one layer is 1/8; 4-bit copies are ~1/7.8
    assert deaths == list(range(1, 9)), deaths


class _Blocks(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
            for _ in range(2))
        self.mode = mode

    def forward(self, x):
        for b in self.blocks:
            x = x + (b(x) if self.mode is None else checkpoint(b, x, use_reentrant=self.mode))
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_gives_same_gradients(reentrant):
    models = [qk.prepare_model(_Blocks(mode), r=4, lora_alpha=8, verbose=False)
              for mode in (None, reentrant)]
    for m in models:
        _randomize_lora(m)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    for m in models:
        # reentrant checkpointing only backpropagates into a block whose input requires grad
        xi = x.clone().requires_grad_(reentrant)
        m(xi).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 8 and all(g is not None for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_merge_mlp_in_place():
    mlp = qk.prepare_model(_mlp(), r=4, lora_alpha=8, compute_dtype=torch.float32, verbose=False)
    _randomize_lora(mlp)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    want = mlp(x)
    assert qk.merge_lora(mlp) is mlp
    assert all(type(mlp[i]) is torch.nn.Linear for i in (0, 2, 4))
    torch.testing.assert_close(mlp(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no QLoRALinear"):
        qk.merge_lora(mlp)


# ------------------------------------------------------------------------------- Llama
def test_llama_all_linear_skips_head_and_matches():
    for tie in (False, True):
        model = _llama(tie=tie)
        ref = copy.deepcopy(model)
        qk.prepare_model(model, r=8, lora_alpha=16, lora_dropout=0.05, verbose=False)
        names = sorted(qk.prepare.lora_layers(model))
        assert len(names) == 14 and "lm_head" not in names
        assert {n.rsplit(".", 1)[-1] for n in names} == set(LLAMA_TARGETS)
        assert type(model.lm_head) is torch.nn.Linear
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"{l}.lora_{ab}.weight" for l in names for ab in "AB"}
        deq = copy.deepcopy(ref)
        with torch.no_grad():
            for n in names:
                deq.get_submodule(n).weight.copy_(model.get_submodule(n).base_layer.dequantize())
            got = model(IDS).logits
            assert _rel(got, deq(IDS).logits) < 2e-2  # bf16 compute only
            assert _rel(got, ref(IDS).logits) < 0.25  # + NF4 rounding of 14 layers


def test_llama_step_save_load_roundtrip(tmp_path):
    model = qk.prepare_model(_llama(), r=8, lora_alpha=16, verbose=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    model.eval()
    qk.save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["target_modules"] == LLAMA_TARGETS and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["use_rslora"] is False
    assert cfg["lora_dropout"] == 0.0 and "base_model_name_or_path" in cfg
    from safetensors import safe_open
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    assert len(keys) == 28 and a.shape == (8, 128) and b.shape == (64, 8)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    # onto a freshly prepared copy of the same base: identical logits
    fresh = qk.prepare_model(_llama(), r=8, lora_alpha=16, verbose=False)
    with torch.no_grad():
        assert not torch.equal(fresh(IDS).logits, model(IDS).logits)
        assert qk.load_adapter(fresh, str(tmp_path)) is fresh
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    # onto an unconverted model: converted from the adapter's config, then loaded
    auto = qk.load_adapter(_llama(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(auto(IDS).logits, model(IDS).logits)


def test_load_errors_name_the_key(tmp_path):
    model = qk.prepare_model(_llama(), r=4, lora_alpha=8, verbose=False)
    qk.save_adapter(model, str(tmp_path))
    other = qk.prepare_model(_llama(), r=8, lora_alpha=8, verbose=False)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    with pytest.raises(ValueError, match="has shape"):
        qk.load_adapter(other, str(tmp_path))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / WEIGHTS_NAME))
    sd["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = sd.pop(key)
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"mlp\.nope\.lora_A\.weight"):
        qk.load_adapter(model, str(tmp_path))
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())
    sd.pop("base_model.model.model.layers.0.mlp.nope.lora_A.weight")
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="missing key " + key.replace(".", r"\.")):
        qk.load_adapter(model, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        qk.load_adapter(model, str(tmp_path / "absent"))


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = qk.prepare_model(_mlp(), r=4, lora_alpha=8, verbose=False)
    _randomize_lora(model)
    qk.save_adapter(model, str(tmp_path))
    saved = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    _randomize_lora(model, seed=7)
    def broken_save(filename, tensors, metadata):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half-written file
        raise KeyboardInterrupt

    monkeypatch.setattr(qk.adapters, "_write_safetensors", broken_save)
    with pytest.raises(KeyboardInterrupt):
        qk.save_adapter(model, str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left
    qk.load_adapter(model, str(tmp_path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_llama_gradient_checkpointing_same_gradients(reentrant):
    # reentrant checkpointing needs the embedding-output hook that prepare_model installs
    models = []
    for ckpt in (False, True):
        m = qk.prepare_model(_llama(), r=4, lora_alpha=8, verbose=False)
        _randomize_lora(m)
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert any(getattr(b, "gradient_checkpointing", False) for b in m.modules())
        m.train()
        m(IDS, labels=IDS).loss.backward()
        models.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    plain, ckpt = models
    assert len(plain) == 28 and all(g is not None and g.abs().sum() > 0 for g in ckpt.values())
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)


def test_llama_merge_dense_and_requantized():
    model = qk.prepare_model(_llama(), r=8, lora_alpha=16, verbose=False)
    _randomize_lora(model, std=0.1)
    with torch.no_grad():
        want = model(IDS).logits
        merged = qk.merge_lora(copy.deepcopy(model))
        assert not qk.prepare.lora_layers(merged)
        assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert _rel(merged(IDS).logits, want) < 1e-2  # bf16 compute rounding in the unmerged
        requant = qk.merge_lora(model, requantize=True)
        for name in ("model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj"):
            q, dense = requant.get_submodule(name), merged.get_submodule(name)
            assert isinstance(q, qk.Linear4bit) and q.compute_dtype == resolve_compute_dtype("auto", "cpu")
            fresh = qk.Linear4bit.from_linear(dense)  # the merged weight, quantized afresh
            assert torch.equal(q.weight, fresh.weight) and torch.equal(q.absmax, fresh.absmax)
        assert _rel(requant(IDS).logits, want) < 0.25  # one more NF4 rounding


# ------------------------------------------------------------------------------- PEFT interop
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_interop_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    ours = qk.prepare_model(_llama(), r=4, lora_alpha=8, quantize=False, verbose=False)
    _randomize_lora(ours)
    qk.save_adapter(ours, str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=1e-5, atol=1e-5)
    # PEFT -> ours
    cfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(_llama(), cfg).eval()
    pm.save_pretrained(str(tmp_path / "theirs"))
    loaded = qk.load_adapter(_llama(), str(tmp_path / "theirs"), quantize=False)
    assert len(qk.prepare.lora_layers(loaded)) == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, pm(IDS).logits, rtol=1e-5, atol=1e-5)


def test_mixed_ranks_roundtrip_via_rank_pattern(tmp_path):
    m = qk.prepare_model(_mlp(), target_modules=["0"], r=4, lora_alpha=4, quantize=False,
                         verbose=False)
    qk.prepare_model(m, target_modules=["2", "4"], r=8, lora_alpha=32, quantize=False, verbose=False)
    _randomize_lora(m)
    qk.save_adapter(m, str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 32)
    assert cfg["rank_pattern"] == {"0": 4} and cfg["alpha_pattern"] == {"0": 4.0}
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    loaded = qk.load_adapter(_mlp(), str(tmp_path), quantize=False)
    assert (loaded[0].r, loaded[0].scaling, loaded[2].r, loaded[2].scaling) == (4, 1.0, 8, 4.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(_mlp(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), m(x), rtol=1e-5, atol=1e-6)
