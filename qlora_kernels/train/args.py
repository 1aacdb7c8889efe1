"""Options of ``qlora-kernels train``, ``merge`` and ``generate``, and every check that can
run before the model loads: a bad option, a bad data line (file and line named), an empty
data set, a ``--out`` that is a file, ``--resume`` without a checkpoint or with one from a
different model or settings. Each raises ``UsageError``; the command prints its one-line
message and exits with code 2.

Example:
    >>> import argparse; p = argparse.ArgumentParser(); add_train_arguments(p)
    >>> p.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o"]).max_grad_norm
    0.3
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
from typing import Iterable, Optional, Tuple

import torch

from .data import read_dataset


class UsageError(ValueError):
    """A bad option or input file: the command prints the message and exits with 2."""


# Arguments that change the training trajectory: a checkpoint written with other values
# cannot be resumed (--out, --resume, --save-every, --keep, --eval-every and
# --max-bad-steps may change between runs).
IDENTITY = ("model", "model_fingerprint", "data", "max_seq_len", "packing", "train_on_prompt",
            "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "min_lr_ratio",
            "max_grad_norm", "max_steps", "epochs", "seed", "r", "lora_alpha", "lora_dropout",
            "target_modules", "rslora", "compute_dtype", "device", "layers")


def run_command(name: str, fn, args) -> int:
    """Run ``fn(args)`` for ``qlora-kernels NAME``: 0, or 2 with one line on stderr for a
    usage error or a missing optional package (never a traceback).

    Example:
        >>> def bad(args): raise UsageError("--x must be >= 1, got 0")
        >>> run_command("merge", bad, None)
        2
    """
    import sys

    from ..demo.model import DemoDependencyError

    try:
        fn(args)
    except (UsageError, DemoDependencyError) as exc:
        print(f"qlora-kernels {name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def check_min(values: Iterable[Tuple[str, object, float]]) -> None:
    """``(option, value, lowest)`` triples: each value (None skipped) must be >= lowest.

    Example:
        >>> check_min([("batch-size", 0, 1)])
        Traceback (most recent call last):
        qlora_kernels.train.args.UsageError: --batch-size must be >= 1, got 0
    """
    for name, value, low in values:
        if value is not None and not value >= low:
            raise UsageError(f"--{name} must be >= {low}, got {value}")


def check_positive(values: Iterable[Tuple[str, float]]) -> None:
    """Each ``(option, value)`` must be a finite number > 0.

    Example:
        >>> check_positive([("lr", float("nan"))])
        Traceback (most recent call last):
        qlora_kernels.train.args.UsageError: --lr must be a finite number > 0, got nan
    """
    for name, value in values:
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name} must be a finite number > 0, got {value}")


def check_dropout(p: float) -> None:
    """``--lora-dropout`` in [0, 1).

    Example:
        >>> check_dropout(0.05)
    """
    if not 0.0 <= p < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {p}")


def resolve_device(device: str) -> str:
    """``--device``: auto (cuda when torch sees one), cpu or cuda[:N].

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    return device


def check_out_dir(out: str, option: str = "--out") -> None:
    """``--out`` must be a directory we can create or write into: checked before any work,
    so a bad one never costs a training run.

    Example:
        >>> check_out_dir("/proc/version")
        Traceback (most recent call last):
        qlora_kernels.train.args.UsageError: --out /proc/version: exists and is not a directory
    """
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {out}: exists and is not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option} {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {out}: {existing} is not writable")


def check_model(path: str) -> None:
    """``--model``: an existing GGUF file or transformers model directory (see
    ``qlora_kernels.demo.model.check_model_path``).

    Example:
        >>> check_model("/nonexistent.gguf")
        Traceback (most recent call last):
        qlora_kernels.train.args.UsageError: --model: no such GGUF file /nonexistent.gguf
    """
    from ..demo.model import check_model_path

    try:
        check_model_path(path)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def model_fingerprint(path: str) -> str:
    """A short digest naming the model's files (a GGUF file's size and first MiB; a
    directory's config.json and weight files' names and sizes), so ``--resume`` refuses
    a checkpoint of another model at the same path.

    Example:
        >>> len(model_fingerprint("/proc/version"))
        16
    """
    h = hashlib.sha256()
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name == "config.json":
                with open(full, "rb") as f:
                    h.update(f.read())
            elif name.endswith((".safetensors", ".bin")):
                h.update(f"{name}:{os.path.getsize(full)}".encode())
    else:
        with open(path, "rb") as f:
            h.update(f.read(2**20))
        h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()[:16]


def parse_target_modules(value: str):
    """``--target-modules``: ``all-linear`` or a comma-separated list of module names.

    Example:
        >>> parse_target_modules("q_proj,v_proj"), parse_target_modules("all-linear")
        (['q_proj', 'v_proj'], 'all-linear')
    """
    if value == "all-linear":
        return value
    names = [t.strip() for t in value.split(",")]
    if not all(names):
        raise UsageError(f"--target-modules {value!r}: an empty name in the list")
    return names


def linear_names_on_disk(model_dir: str) -> Optional[list]:
    """Names of the modules with a 2-D ``.weight`` in a safetensors model directory (read
    from the file headers, no tensor loaded), or None when they cannot be listed.

    Example:
        >>> linear_names_on_disk("/nonexistent") is None
        True
    """
    from ..loading import open_checkpoint

    try:
        ckpt = open_checkpoint(model_dir)
    except (OSError, ValueError):
        return None
    return [k[:-len(".weight")] for k in ckpt.keys()
            if k.endswith(".weight") and len(ckpt.shape(k)) == 2]


def check_target_modules(targets, model_dir: Optional[str]) -> None:
    """Every name in ``targets`` must match a module of the checkpoint (PEFT's rule: the
    name or a dotted suffix). Skipped when the names cannot be read before loading.

    Example:
        >>> check_target_modules("all-linear", None)
    """
    if targets == "all-linear" or model_dir is None:
        return
    names = linear_names_on_disk(model_dir)
    if names is None:
        return
    from ..prepare import match_module_name

    for t in targets:
        if not any(match_module_name(n, [t]) for n in names):
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UsageError(f"--target-modules: no module named {t!r} in {model_dir} "
                             f"(linear layers there: {', '.join(short)})")


def check_layers(layers: Optional[int], model_dir: Optional[str]) -> None:
    """``--layers`` against the model's ``num_hidden_layers`` (from its config.json, when
    it can be read before loading).

    Example:
        >>> check_layers(None, None)
    """
    if layers is None or model_dir is None:
        return
    import json

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            n = json.load(f).get("num_hidden_layers")
    except (OSError, ValueError):
        return
    if isinstance(n, int) and layers > n:
        raise UsageError(f"--layers must be between 1 and {n} (the model's decoder layers), got {layers}")


def data_paths(data: str) -> Tuple[str, Optional[str]]:
    """``--data TRAIN.jsonl[,EVAL.jsonl]``: the two paths, each an existing file.

    Example:
        >>> data_paths("/etc/hostname")
        ('/etc/hostname', None)
    """
    parts = data.split(",")
    if len(parts) > 2 or not all(parts):
        raise UsageError(f"--data {data}: expected TRAIN.jsonl[,EVAL.jsonl], got {len(parts)} "
                         f"comma-separated names")
    for p in parts:
        if not os.path.isfile(p):
            raise UsageError(f"--data: no such file {p}")
    return parts[0], (parts[1] if len(parts) > 1 else None)


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """The LoRA options shared by ``train`` (and, with the demo's defaults, ``demo``).

    Example:
        >>> p = argparse.ArgumentParser(); add_lora_arguments(p); p.parse_args([]).r
        16
    """
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``qlora-kernels train``.

    Example:
        >>> p = argparse.ArgumentParser(); add_train_arguments(p)
        >>> p.parse_args(["--model", "m", "--data", "d", "--out", "o", "--packing"]).packing
        True
    """
    p.add_argument("--model", required=True, help="a .gguf file or a local transformers model directory")
    p.add_argument("--data", required=True, help="TRAIN.jsonl[,EVAL.jsonl] (chat, instruction or text)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, adapter/, log.jsonl, loss.png)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per example (longer ones are cut)")
    p.add_argument("--packing", action="store_true", help="pack short examples into --max-seq-len sequences")
    p.add_argument("--train-on-prompt", action="store_true", help="loss on prompt tokens too")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--max-grad-norm", type=float, default=0.3, help="gradient-norm clipping (0: off)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    steps.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    p.add_argument("--seed", type=int, default=0)
    add_lora_arguments(p)
    p.add_argument("--target-modules", default="all-linear", help="all-linear or names, comma-separated")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized LoRA scaling (alpha / sqrt(r))")
    p.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bf16 on GPUs and on CPUs with native bf16, else float32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (smoke tests)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, default=None, help="keep the newest N checkpoints (default all)")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after N steps in a row with a non-finite loss or gradient")


def check_train_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check ``train``'s options and read its data files, before any model loads; returns
    a copy with ``device``, ``compute_dtype`` and ``target_modules`` resolved and
    ``train_path``/``eval_path``, ``train_format``/``eval_format`` and ``records`` added.
    Raises ``UsageError``.

    Example:
        >>> import argparse; p = argparse.ArgumentParser(); add_train_arguments(p)
        >>> check_train_args(p.parse_args(["--model", "m", "--data", "d", "--out", "o",
        ...                                "--save-every", "0"]))
        Traceback (most recent call last):
        qlora_kernels.train.args.UsageError: --save-every must be >= 1, got 0
    """
    from ..compute_dtype import resolve_compute_dtype

    a = argparse.Namespace(**vars(args))
    check_min([("save-every", a.save_every, 1), ("batch-size", a.batch_size, 1),
               ("grad-accum", a.grad_accum, 1), ("max-seq-len", a.max_seq_len, 2),
               ("r", a.r, 1), ("layers", a.layers, 1), ("max-steps", a.max_steps, 1),
               ("warmup-steps", a.warmup_steps, 0), ("eval-every", a.eval_every, 0),
               ("keep", a.keep, 1), ("max-bad-steps", a.max_bad_steps, 1),
               ("max-grad-norm", a.max_grad_norm, 0), ("min-lr-ratio", a.min_lr_ratio, 0)])
    check_positive([("lr", a.lr), ("lora-alpha", a.lora_alpha)]
                   + ([("epochs", a.epochs)] if a.epochs is not None else []))
    check_dropout(a.lora_dropout)
    if a.min_lr_ratio > 1:
        raise UsageError(f"--min-lr-ratio must be <= 1, got {a.min_lr_ratio}")
    a.device = resolve_device(a.device)
    check_out_dir(a.out)
    check_model(a.model)
    a.model = os.path.abspath(a.model)
    a.model_fingerprint = model_fingerprint(a.model)
    a.target_modules = parse_target_modules(a.target_modules)
    model_dir = converted_dir(a.model, create=False)
    check_target_modules(a.target_modules, model_dir)
    check_layers(a.layers, model_dir)
    dtype = a.compute_dtype if a.compute_dtype == "auto" else getattr(torch, a.compute_dtype)
    a.compute_dtype = str(resolve_compute_dtype(dtype, torch.device(a.device)))[6:]
    a.train_path, a.eval_path = data_paths(a.data)
    a.data = ",".join(os.path.abspath(p) for p in (a.train_path, a.eval_path) if p)
    try:
        a.train_format, a.records = read_dataset(a.train_path)
        a.eval_format, a.eval_records = (read_dataset(a.eval_path) if a.eval_path
                                         else (None, None))
    except OSError as exc:
        raise UsageError(f"--data: {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_resume(a)
    return a


def converted_dir(model: str, create: bool = True) -> Optional[str]:
    """The transformers directory to load ``--model`` from: the directory itself, or for a
    GGUF file its conversion (cached by ``qlora_kernels.demo.model``; made when ``create``,
    else None when not cached yet).

    Example:
        >>> converted_dir("/some/model/dir")
        '/some/model/dir'
    """
    if not model.lower().endswith(".gguf"):
        return model
    from ..demo.model import _cache_dir, converted_model_dir

    if create:
        return str(converted_model_dir(model))
    cached = _cache_dir(__import__("pathlib").Path(model))
    return str(cached) if (cached / "config.json").is_file() else None


def identity(a: argparse.Namespace) -> dict:
    """The arguments a checkpoint records and ``--resume`` compares (``IDENTITY``).

    Example:
        >>> identity(argparse.Namespace(**{k: 1 for k in IDENTITY}))["seed"]
        1
    """
    return {k: getattr(a, k) for k in IDENTITY}


def check_resume(a: argparse.Namespace) -> None:
    """With ``--resume``: ``--out`` must hold a complete checkpoint written with the same
    model and settings; without it, ``--out`` must hold none (no silent mixing of runs).

    Example (needs a run directory):
        check_resume(args)
    """
    from .checkpoint import latest_checkpoint, read_checkpoint_args

    ckpt = latest_checkpoint(a.out)
    if not a.resume:
        if ckpt is not None:
            raise UsageError(f"--out {a.out} holds checkpoints of an earlier run "
                             f"({os.path.basename(ckpt)}): pass --resume to continue it, or "
                             f"choose another --out")
        return
    if ckpt is None:
        raise UsageError(f"--resume: no complete checkpoint-STEP directory in {a.out}")
    saved = read_checkpoint_args(ckpt)
    mine = identity(a)
    diff = [k for k in IDENTITY if saved.get(k) != mine[k]]
    if diff:
        k = diff[0]
        raise UsageError(f"--resume: {ckpt} was written with a different "
                         f"{'model' if k.startswith('model') else '--' + k.replace('_', '-')} "
                         f"({saved.get(k)!r}, now {mine[k]!r}); it cannot be continued with "
                         f"these settings")
