"""TRL's SFTTrainer on a PEFT model over qlora_kernels' Linear4bit, with our PagedAdamW and
gradient checkpointing, on CPU (tiny Llama from a config, a word-level tokenizer built
here: no download). trl is a test-only dependency: the test skips without it.

The optimizer is passed as ``optimizer_cls_and_kwargs``, not as an instance
(``optimizers=(opt, None)``, which tests/test_hf_trainer.py covers with Trainer): for a
4-bit model SFTTrainer casts the adapters to bf16, and on resume PEFT's ``load_adapter``
(peft 0.21.2, ``cast_adapter_dtype``) replaces bf16 adapter parameters by new float32
ones, so an optimizer built before the trainer would keep stepping the old, detached
parameters and the model would silently stop training (whatever the quantizer:
bitsandbytes' models take the same path). A class is instantiated by the trainer after
the adapter is loaded."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import qlora_kernels as qk  # noqa: E402
import qlora_kernels.hf  # noqa: E402,F401

from hf_tiny import (VOCAB, adapter_params, check_loss_fell, check_trainer_checkpoint,  # noqa: E402
                     import_peft_with_shim, peft_model_for_training, save_tiny_llama,
                     training_arguments)
import_peft_with_shim()  # skips the module without peft or the PEFT shim

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]
STEPS, SAVE_AT = 8, 4


def _tokenizer():
    """Word-level: "w<i>" is token i; 0 pads, 1 ends a sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="</s>")


def _dataset(n=32, words=15):
    """A few fixed sentences (a learnable pattern) repeated: the loss must fall."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(2, VOCAB, (4, words), generator=g)
    texts = [" ".join(f"w{int(i)}" for i in base[k % 4]) for k in range(n)]
    return datasets.Dataset.from_dict({"text": texts})


def _sft_trainer(checkpoint, out_dir):
    model = peft_model_for_training(checkpoint)
    args = trl.SFTConfig(**training_arguments(out_dir, STEPS, SAVE_AT), max_length=32)
    return trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(),
                          processing_class=_tokenizer(),
                          optimizer_cls_and_kwargs=(qk.optim.PagedAdamW, {"lr": args.learning_rate}))


def test_sft_trainer_trains_checkpoints_and_resumes(tmp_path):
    checkpoint = save_tiny_llama(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: paged state in ordinary memory
        trainer = _sft_trainer(checkpoint, tmp_path / "run")
        trainer.train()
    assert trainer.model.is_gradient_checkpointing
    n_wrapped = sum(isinstance(m, qlora_kernels.hf.lora_linear4bit_class())
                    for m in trainer.model.modules())
    assert n_wrapped > 0
    check_loss_fell(trainer, STEPS)
    final = adapter_params(trainer.model)

    ckpt = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    check_trainer_checkpoint(ckpt, SAVE_AT)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: paged state in ordinary memory
        resumed = _sft_trainer(checkpoint, tmp_path / "run")
        resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == STEPS
    inner = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    assert isinstance(inner, qk.optim.PagedAdamW) and inner.paged  # paged state resumes paged
    trainable = [p for p in resumed.model.parameters() if p.requires_grad]
    assert all(int(inner.state[p]["step"]) == STEPS for p in trainable)  # the model's own
    again = adapter_params(resumed.model)
    assert again.keys() == final.keys()
    for k in final:  # the resumed adapters are float32 (PEFT's upcast), the others bf16
        torch.testing.assert_close(again[k], final[k].float(), atol=2e-2, rtol=2e-2)
