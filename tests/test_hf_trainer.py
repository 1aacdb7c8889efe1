"""transformers.Trainer on a PEFT model over qlora_kernels' Linear4bit, with our PagedAdamW
and gradient checkpointing, on CPU (tiny Llama from a config, no download)."""
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import qlora_kernels as qk  # noqa: E402
import qlora_kernels.hf  # noqa: E402,F401

if peft.__version__ not in qlora_kernels.hf.KNOWN_PEFT_VERSIONS:  # the shim stays out (one warning)
    pytest.skip(f"peft {peft.__version__}: the PEFT shim is checked against "
                f"{qlora_kernels.hf.KNOWN_PEFT_VERSIONS}", allow_module_level=True)
from hf_tiny import VOCAB, load_quantized, save_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]
STEPS, SAVE_AT = 10, 5


class _Repeated(torch.utils.data.Dataset):
    """A few fixed sequences (with a learnable pattern) repeated: the loss must fall."""

    def __init__(self, n=32, seq=16):
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, VOCAB, (4, seq), generator=g)
        self.rows = [base[i % 4] for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _trainer(checkpoint, out_dir, max_steps=STEPS):
    model = peft.prepare_model_for_kbit_training(load_quantized(checkpoint))
    torch.manual_seed(0)  # the same adapter init in every run
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_steps=SAVE_AT,
        save_strategy="steps", report_to=[], use_cpu=True, gradient_checkpointing=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: paged state in ordinary memory
        opt = qk.optim.PagedAdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Repeated(),
                                optimizers=(opt, None))


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    checkpoint = save_tiny_llama(tmp_path / "base")
    trainer = _trainer(checkpoint, tmp_path / "run")
    assert trainer.model.is_gradient_checkpointing
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    final = _adapter(trainer.model)

    ckpt = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files  # the adapter only, not the frozen base
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    n_trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert len(opt_state["state"]) == n_trainable
    assert all(int(s["step"]) == SAVE_AT for s in opt_state["state"].values())

    resumed = _trainer(checkpoint, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == STEPS
    assert isinstance(resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer")
                      else resumed.optimizer, qk.optim.PagedAdamW)
    inner = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    assert inner.paged  # paged state resumes paged
    again = _adapter(resumed.model)
    assert again.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(again[k], final[k], atol=1e-5, rtol=1e-4)
