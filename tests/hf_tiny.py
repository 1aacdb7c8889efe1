"""A tiny ``LlamaForCausalLM`` checkpoint built from a config (no download), shared by the
tests of qlora_kernels.hf (test_hf_*.py). Imported only after pytest.importorskip("transformers")."""
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


def import_peft_with_shim():
    """peft, or a module-level skip: without peft, or with a PEFT that qlora_kernels.hf's
    shim was not checked against (the shim then stays out, with one warning)."""
    import pytest
    peft = pytest.importorskip("peft")
    import qlora_kernels.hf as qkhf
    if peft.__version__ not in qkhf.KNOWN_PEFT_VERSIONS:
        pytest.skip(f"peft {peft.__version__}: the PEFT shim is checked against "
                    f"{qkhf.KNOWN_PEFT_VERSIONS}", allow_module_level=True)
    return peft


def peft_model_for_training(checkpoint):
    """The tiny checkpoint loaded 4-bit, prepared for k-bit training and wrapped by PEFT's
    LoRA (r=8, all-linear) with the same adapter init every time."""
    peft = import_peft_with_shim()
    model = peft.prepare_model_for_kbit_training(load_quantized(checkpoint))
    torch.manual_seed(0)
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))


def training_arguments(out_dir, max_steps: int, save_steps: int) -> dict:
    """The Trainer arguments the trainer tests share: CPU, constant lr 1e-2, batch 4,
    gradient checkpointing, a loss logged every step, a checkpoint every ``save_steps``."""
    return dict(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4,
                learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                save_steps=save_steps, save_strategy="steps", report_to=[], use_cpu=True,
                gradient_checkpointing=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)


def adapter_params(model) -> dict:
    """A copy of every LoRA parameter of ``model`` by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def check_loss_fell(trainer, steps: int) -> None:
    """One logged loss per step, the last three's mean under 0.8 x the first three's."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps, losses
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def check_trainer_checkpoint(ckpt_dir, steps: int) -> None:
    """A Trainer checkpoint of a PEFT model: the adapter and the optimizer state (``steps``
    steps for every parameter), not the frozen base."""
    import os
    files = set(os.listdir(ckpt_dir))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files, files
    assert "model.safetensors" not in files
    opt_state = torch.load(os.path.join(ckpt_dir, "optimizer.pt"), weights_only=False)
    assert opt_state["state"] and all(int(s["step"]) == steps for s in opt_state["state"].values())
