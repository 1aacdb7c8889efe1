"""``qlora-kernels generate``: chat-formatted generation on the 4-bit base with an
optional adapter, streamed to the terminal; ``--interactive`` reads one prompt per line.

Example:
    $ qlora-kernels generate --model model.gguf --adapter runs/x/adapter --prompt "Hi" \\
          --max-new-tokens 40
"""
from __future__ import annotations

import argparse
import sys

import torch

from .args import check_min, check_model, resolve_device, run_command


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``qlora-kernels generate``.

    Example:
        >>> p = argparse.ArgumentParser(); add_generate_arguments(p)
        >>> p.parse_args(["--model", "m", "--prompt", "hi"]).temperature
        0.0
    """
    p.add_argument("--model", required=True, help="the base: a .gguf file or a transformers directory")
    p.add_argument("--adapter", default=None, help="a PEFT-layout adapter directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="one user message")
    which.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic)")
    p.add_argument("--seed", type=int, default=0, help="for sampling (--temperature > 0)")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def run_generate(args: argparse.Namespace, out=None) -> list:
    """Generate as ``args`` say, streaming to ``out`` (stdout); returns the replies.

    Example (needs a model):
        >>> run_generate(parser.parse_args([...]))   # doctest: +SKIP
    """
    from transformers import TextStreamer

    from .base import load_base
    from .data import warn_if_fallback
    from .loop import generate
    from .merge import adapted_model, check_adapter_dir

    out = out or sys.stdout
    check_model(args.model)
    check_min([("max-new-tokens", args.max_new_tokens, 1), ("temperature", args.temperature, 0)])
    device = resolve_device(args.device)
    if args.adapter is not None:
        check_adapter_dir(args.adapter)
        model, tok = adapted_model(args.model, args.adapter, args.compute_dtype, device)
    else:
        model, tok = load_base(args.model, args.compute_dtype, device)
    warn_if_fallback(tok)

    class Streamer(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    prompts = [args.prompt] if args.prompt is not None else (line.strip() for line in sys.stdin)
    replies = []
    for prompt in prompts:
        if not prompt:
            continue
        torch.manual_seed(args.seed)
        replies.append(generate(model, tok, prompt, args.max_new_tokens, args.temperature,
                                streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True)))
    return replies


def main(args: argparse.Namespace) -> int:
    """Entry point of ``qlora-kernels generate`` (exit 2 with one line on bad input).

    Example:
        $ python -m qlora_kernels generate --model m.gguf --prompt "Hello"
    """
    return run_command("generate", run_generate, args)
