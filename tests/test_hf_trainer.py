"""transformers.Trainer on a PEFT model over qlora_kernels' Linear4bit, with our PagedAdamW
and gradient checkpointing, on CPU (tiny Llama from a config, no download)."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
import qlora_kernels as qk  # noqa: E402
import qlora_kernels.hf  # noqa: E402,F401

from hf_tiny import (VOCAB, adapter_params, check_loss_fell, check_trainer_checkpoint,  # noqa: E402
                     import_peft_with_shim, peft_model_for_training, save_tiny_llama,
                     training_arguments)
import_peft_with_shim()  # skips the module without peft or the PEFT shim

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
    model = peft_model_for_training(checkpoint)
    args = transformers.TrainingArguments(**training_arguments(out_dir, max_steps, SAVE_AT))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: paged state in ordinary memory
        opt = qk.optim.PagedAdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Repeated(),
                                optimizers=(opt, None))


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    checkpoint = save_tiny_llama(tmp_path / "base")
    trainer = _trainer(checkpoint, tmp_path / "run")
    assert trainer.model.is_gradient_checkpointing
    trainer.train()
    check_loss_fell(trainer, STEPS)
    final = adapter_params(trainer.model)

    ckpt = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    check_trainer_checkpoint(ckpt, SAVE_AT)
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    n_trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert len(opt_state["state"]) == n_trainable

    resumed = _trainer(checkpoint, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == STEPS
    assert isinstance(resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer")
                      else resumed.optimizer, qk.optim.PagedAdamW)
    inner = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    assert inner.paged  # paged state resumes paged
    again = adapter_params(resumed.model)
    assert again.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(again[k], final[k], atol=1e-5, rtol=1e-4)
