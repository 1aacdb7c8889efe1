"""QLoRA with the Hugging Face stack (transformers + PEFT + Trainer) on qlora_kernels.

    python examples/hf_trainer_qlora.py                       # SmolLM2-135M (the demo's), CPU
    python examples/hf_trainer_qlora.py --backend bitsandbytes # the same with bitsandbytes
    python examples/hf_trainer_qlora.py --model DIR --steps 200

The user code is the usual bitsandbytes recipe with one line changed: the quantization
config. ``import qlora_kernels.hf`` registers it with transformers and teaches PEFT's
``LoraConfig(target_modules="all-linear")`` to wrap our 4-bit layers; the optimizer is
``qlora_kernels.optim.PagedAdamW``. Data: the demo's chat examples, tokenized and packed
into blocks of ``--seq-len`` tokens (causal LM loss on every token). At the end the
adapter is saved in PEFT's layout, and ``--json`` writes the step times and peak RSS
(benchmarks/bench_hf_trainer.py runs this script once per backend).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["qlora_kernels", "bitsandbytes"], default="qlora_kernels")
    p.add_argument("--model", default=None, help="transformers model directory "
                   "(default: the demo's SmolLM2-135M-Instruct, converted from its GGUF once)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="model and compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--out", default="hf_trainer_qlora_out")
    p.add_argument("--json", default=None, help="write step times and peak RSS here")
    return p.parse_args(argv)


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(backend: str, path: str, dtype: torch.dtype):
    """The model loaded 4-bit, the way each stack's users write it."""
    from transformers import AutoModelForCausalLM
    if backend == "qlora_kernels":
        import qlora_kernels.hf
        config = qlora_kernels.hf.QuantizationConfig(
            quant_type="nf4", double_quant=True, compute_dtype=dtype)
    else:
        from transformers import BitsAndBytesConfig
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype,
                                                device_map="cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(backend: str, params, lr: float):
    if backend == "qlora_kernels":
        import qlora_kernels as qk
        return qk.optim.PagedAdamW(params, lr=lr, weight_decay=0.0)
    import bitsandbytes as bnb
    return bnb.optim.PagedAdamW(params, lr=lr, weight_decay=0.0)


class PackedChats(torch.utils.data.Dataset):
    """The demo's chat examples as one token stream cut into ``seq_len`` blocks."""

    def __init__(self, tokenizer, seq_len: int):
        from qlora_kernels.demo.data import encode_chat, load_splits
        train, _ = load_splits(None)
        stream = []
        for messages in train:
            stream += encode_chat(tokenizer, messages, max_len=10 ** 6)[0] + [tokenizer.eos_token_id]
        n = len(stream) // seq_len
        self.blocks = torch.tensor(stream[:n * seq_len]).view(n, seq_len)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main(argv=None):
    args = parse_args(argv)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    on_gpu = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    if args.model is None:
        from qlora_kernels.demo.model import converted_model_dir
        args.model = str(converted_model_dir())
    t0 = time.perf_counter()
    model = load_model(args.backend, args.model, dtype)
    load_s, load_rss = time.perf_counter() - t0, rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=16, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]

    step_times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], gradient_checkpointing=True, use_cpu=not on_gpu, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, bf16=dtype == torch.bfloat16 and on_gpu)
    trainer = Trainer(model=model, args=targs, train_dataset=PackedChats(tokenizer, args.seq_len),
                      optimizers=(make_optimizer(args.backend, trainable, args.lr), None),
                      callbacks=[StepTimer()])
    result = trainer.train()
    model.save_pretrained(os.path.join(args.out, "adapter"))

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    warm = step_times[min(3, len(step_times) - 1):]
    tokens_per_step = args.batch_size * args.seq_len
    summary = {
        "backend": args.backend, "model": os.path.basename(os.path.normpath(args.model)),
        "dtype": str(dtype).removeprefix("torch."), "steps": args.steps,
        "tokens_per_step": tokens_per_step, "median_step_s": statistics.median(warm),
        "tokens_per_s": tokens_per_step / statistics.median(warm),
        "load_s": load_s, "rss_after_load_mib": load_rss, "peak_rss_mib": rss_mib(),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
