"""QLoRA fine-tuning under FSDP2 (``fully_shard``), one process per device.

    torchrun --nproc_per_node 2 examples/fsdp_qlora.py                  # CPU, gloo, tiny Llama
    torchrun --nproc_per_node 8 examples/fsdp_qlora.py --model PATH     # GPUs, NCCL, a real model

The same script runs on CPUs with the gloo backend and on GPUs with NCCL (picked by
``torch.cuda.is_available()``). Each rank holds 1/world_size of the packed 4-bit weights and
of the adapters; the quantization state (absmax, nested scales) is replicated. At the end the
full model (bitsandbytes layout) and the adapters (PEFT layout) are written once, by rank 0.

Without ``--model`` the model is a small LlamaForCausalLM built from a config (no download)
and the data random tokens: a smoke test of the distributed mechanics, not a recipe.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

import qlora_kernels as qk
from qlora_kernels import distributed as qd


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="transformers model name or path (default: a tiny Llama)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute/adapter dtype (auto: bfloat16 on GPUs, float32 on CPUs)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--out", default="fsdp_qlora_out")
    return p.parse_args()


def build_model(args, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)  # every rank builds the same model
        model = LlamaForCausalLM(cfg).to(dtype)
    # Quantize on the device (fast on GPUs), then one rank's share is all that stays there
    # after fully_shard. (For models that do not fit one device, load on the meta device and
    # fill shard by shard; out of scope here.)
    model.to(device)
    qk.prepare_model(model, target_modules="all-linear", r=args.r, lora_alpha=args.lora_alpha,
                     compute_dtype=dtype, verbose=qd.rank() == 0)
    # The packed bytes take the dtype of the parameters beside them (see docs/fsdp.md).
    qd.set_quant_storage(model, dtype)
    model.config.use_cache = False  # training: no KV cache
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]

    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = build_model(args, dtype, device)
    # param_dtype equals quant_storage, so FSDP never casts the packed bytes; gradients of
    # the adapters are reduced in float32.
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    qd.shard_model(model, mp_policy=mp)
    held = qd.local_shard_bytes(model)
    if rank == 0:
        print(f"world size {ws}, backend {dist.get_backend()}, device {device.type}")
    for r in range(ws):
        if r == rank:
            print(f"rank {rank}: packed 4-bit {held['packed_4bit'] / 1e6:.3f} MB of "
                  f"{held['packed_4bit_total'] / 1e6:.3f} MB, quant state (replicated) "
                  f"{held['quant_state'] / 1e6:.3f} MB, adapters {held['adapters'] / 1e6:.3f} MB, "
                  f"other {held['other_params'] / 1e6:.3f} MB", flush=True)
        dist.barrier()

    # Frozen 4-bit weights have requires_grad=False: AdamW keeps state for adapters only.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own share of the data
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.detach().float().clone()
        dist.all_reduce(avg)
        if rank == 0:
            print(f"step {step}: loss {avg.item() / ws:.4f} ({time.perf_counter() - t0:.2f} s)",
                  flush=True)

    if cuda and rank == 0:
        print(f"peak memory on rank 0: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    os.makedirs(args.out, exist_ok=True)
    qd.save_full_state_dict(model, os.path.join(args.out, "model.safetensors"))
    qd.save_adapter_rank0(model, os.path.join(args.out, "adapter"),
                          base_model_name_or_path=args.model)
    if rank == 0:
        print(f"saved {args.out}/model.safetensors (bitsandbytes layout) and "
              f"{args.out}/adapter (PEFT layout)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
