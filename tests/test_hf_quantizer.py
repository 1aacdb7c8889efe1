"""qlora_kernels.hf's transformers quantizer on a tiny LlamaForCausalLM (no download)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
import qlora_kernels as qk  # noqa: E402
import qlora_kernels.hf as qkhf  # noqa: E402
from hf_tiny import LAYERS, LINEARS_PER_LAYER, load_quantized, save_tiny_llama, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _dense_state(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def test_import_qlora_kernels_does_not_import_transformers_or_peft():
    code = ("import sys, qlora_kernels; "
            "print(sorted(m for m in ('transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("settings", [
    dict(),
    dict(quant_type="fp4", blocksize=128, double_quant=False),
    dict(quant_type="int4", blocksize=256, dtype=torch.bfloat16),
])
def test_layers_are_linear4bit_with_the_bytes_of_quantize_4bit(checkpoint, settings):
    settings = dict(settings)
    dtype = settings.get("dtype", torch.float32)
    model = load_quantized(checkpoint, **settings)
    cfg = qkhf.QuantizationConfig(**{k: v for k, v in settings.items() if k != "dtype"})
    dense = _dense_state(checkpoint)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, qk.Linear4bit)}
    assert len(layers) == LAYERS * LINEARS_PER_LAYER
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output embedding stays dense
    for name, lin in layers.items():
        packed, state = qk.quantize_4bit(dense[name + ".weight"].to(dtype), blocksize=cfg.blocksize,
                                         quant_type=cfg.quant_type, double_quant=cfg.double_quant)
        assert torch.equal(lin.packed_weight, packed), name
        assert torch.equal(lin.absmax, state.absmax), name
        assert lin.quant_type == cfg.quant_type and lin.blocksize == cfg.blocksize
        assert lin.double_quant == cfg.double_quant and lin.weight_dtype == dtype
        if cfg.double_quant:
            assert torch.equal(lin.nested_absmax, state.state2.absmax)
            assert lin.offset == pytest.approx(float(state.offset))
        assert not lin.weight.requires_grad
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_serializable()
    assert model.is_loaded_in_4bit


def test_logits_match_the_dequantized_dense_model(checkpoint):
    model = load_quantized(checkpoint)
    dense = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for name, lin in model.named_modules():
        if isinstance(lin, qk.Linear4bit):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(lin.dequantize(torch.float32))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_save_pretrained_reloads_identically_without_the_config(checkpoint, tmp_path, quant_storage):
    model = load_quantized(checkpoint, quant_storage=quant_storage, compute_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)["quantization_config"]
    assert saved["quant_method"] == "qlora_kernels" and saved["compute_dtype"] == "bfloat16"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    from qlora_kernels.hf.mapped_files import file_mapping
    assert not [k for k, t in again.state_dict().items() if file_mapping(t) is not None]
    lin = again.model.layers[0].mlp.down_proj
    assert isinstance(lin, qk.Linear4bit) and lin.quant_storage == quant_storage
    assert lin.compute_dtype == torch.bfloat16
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_loading_with_different_settings_than_the_checkpoint_raises(checkpoint, tmp_path):
    load_quantized(checkpoint).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantized with .*'nf4'.* asks for .*'fp4'"):
        load_quantized(tmp_path, quant_type="fp4")
    # a config.json that disagrees with the tensors it describes: each layer is checked
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"]["blocksize"] = 128
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_deserialize_names_both_settings(checkpoint, tmp_path):
    # the message the loader's report holds for a layer stored with other settings
    from qlora_kernels.hf.quantizer import DeserializeQuantized
    model = load_quantized(checkpoint)
    lin = model.model.layers[0].self_attn.q_proj
    tensors = {k.removeprefix("model.layers.0.self_attn.q_proj."): [v]
               for k, v in model.state_dict().items() if k.startswith("model.layers.0.self_attn.q_proj.")}
    quantizer = type(model.hf_quantizer)(qkhf.QuantizationConfig(blocksize=128))
    with pytest.raises(ValueError, match=r"q_proj: the checkpoint was quantized with .*'blocksize': 64.* "
                                         r"asks for .*'blocksize': 128"):
        DeserializeQuantized(quantizer).convert(tensors, model=model,
                                                full_layer_name="model.layers.0.self_attn.q_proj.weight")
    assert model.model.layers[0].self_attn.q_proj is lin  # nothing replaced


@pytest.mark.parametrize("bad, match", [
    (dict(quant_type="int8"), "quant_type"),
    (dict(blocksize=100), "blocksize"),
    (dict(quant_storage=torch.int32), "quant_storage"),
    (dict(quant_storage="float8"), "quant_storage"),
    (dict(compute_dtype=torch.int8), "compute_dtype"),
    (dict(load_in_4bit=True), "unknown field"),
])
def test_bad_config_raises_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        qkhf.QuantizationConfig(**bad)


def test_config_round_trips_through_its_dict():
    cfg = qkhf.QuantizationConfig(quant_type="fp4", compute_dtype="bfloat16",
                                  quant_storage=torch.float16, skip_modules=["o_proj"])
    again = qkhf.QuantizationConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.__dict__ == cfg.__dict__
    assert again.compute_dtype is torch.bfloat16 and again.quant_storage is torch.float16


def test_skip_modules_stay_dense_and_no_linear_warns_once(checkpoint):
    model = load_quantized(checkpoint, skip_modules=["o_proj", "lm_head"])
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, qk.Linear4bit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_quantized(checkpoint, skip_modules=["model", "lm_head"])
    ours = [w for w in caught if "no nn.Linear layer to quantize" in str(w.message)]
    assert len(ours) == 1
    assert not any(isinstance(m, qk.Linear4bit) for m in model.modules())


def test_quantize_weight_is_the_per_weight_step(rng):
    w = torch.randn(48, 80, generator=rng, dtype=torch.bfloat16)
    cfg = qkhf.QuantizationConfig(quant_type="fp4", blocksize=32, quant_storage=torch.float32)
    lin = qkhf.quantize_weight("layer", w, cfg)
    packed, state = qk.quantize_4bit(w, blocksize=32, quant_type="fp4")
    assert torch.equal(lin.packed_weight, packed) and lin.weight.dtype == torch.float32
    torch.testing.assert_close(lin.dequantize(), qk.dequantize_4bit(packed, state), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer: expected a 2-D weight"):
        qkhf.quantize_weight("layer", w.flatten(), cfg)
    with pytest.raises(ValueError, match="layer: .*NaN"):
        qkhf.quantize_weight("layer", torch.full((4, 64), float("nan")), cfg)


def test_dequantize_gives_dense_layers(checkpoint):
    model = load_quantized(checkpoint)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected = q_proj.dequantize(torch.float32)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    model.dequantize()
    dense = model.model.layers[0].self_attn.q_proj
    assert type(dense) is torch.nn.Linear and torch.equal(dense.weight, expected)
    assert not any(isinstance(m, qk.Linear4bit) for m in model.modules())
    assert not getattr(model.config, "quantization_config", None)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-5)


def _resident_bytes(path):
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
                inside = len(fields) == 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_pages_of_a_checkpoint_opened_after_the_snapshot_are_released(tmp_path, rng):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from qlora_kernels.hf.mapped_files import (file_mapping, mapped_files, release_new_mappings,
                                               release_pages)
    w = torch.randn(512, 1024, generator=rng)  # 2 MiB: many whole pages
    save_file({"w": w}, tmp_path / "shard.safetensors")
    before = mapped_files()
    anonymous = torch.randn(256, 256, generator=rng)
    kept = anonymous.clone()
    assert release_pages(anonymous) == 0 and torch.equal(anonymous, kept)  # never zeroed
    with safe_open(tmp_path / "shard.safetensors", framework="pt") as f:
        view = f.get_slice("w")[...]
    assert file_mapping(view) == str(tmp_path / "shard.safetensors")
    assert float(view.sum()) == pytest.approx(float(w.sum()), rel=1e-4)  # touch every page
    assert _resident_bytes(tmp_path / "shard.safetensors") >= w.nbytes
    assert release_new_mappings(before) >= w.nbytes
    assert _resident_bytes(tmp_path / "shard.safetensors") < 2 * 4096  # at most the header pages
    assert torch.equal(view, w)  # read again from the file, unchanged
    assert release_new_mappings(mapped_files() | before) == 0  # mappings in the snapshot stay


def test_a_loaded_model_holds_no_view_of_the_checkpoint_file(checkpoint):
    from qlora_kernels.hf.mapped_files import file_mapping
    for dtype in (torch.float32, torch.bfloat16):  # the kept tensors as read, and cast
        model = load_quantized(checkpoint, dtype=dtype)
        mapped = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if file_mapping(t) is not None]
        assert mapped == [], mapped


def test_bench_load_child_measures_the_quantizer(tmp_path):
    # bench_hf_trainer.py --load's own child, in this process, on bench_memory's tiny shape
    from benchmarks.bench_hf_trainer import child_hf_load
    from benchmarks.bench_memory import write_checkpoint
    write_checkpoint("tiny", str(tmp_path))
    r = child_hf_load(str(tmp_path), "cpu")
    assert r["peak"] >= r["runtime"] > 0 and r["model_bytes"] > 0 and r["seconds"] > 0
