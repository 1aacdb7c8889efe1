"""Training checkpoints for exact resume: ``DIR/checkpoint-STEP/`` holds

- ``adapter/``: the LoRA adapter (PEFT layout, ``qk.save_adapter``, reproducible bytes);
- ``optimizer.pt``: the optimizer's ``state_dict`` (paged state loads back paged);
- ``rng.pt``: the state of every generator the run draws from (torch CPU, every CUDA
  device, Python's ``random``, NumPy's global one);
- ``state.json``: the step, the schedule, the data order and position, the count of
  non-finite steps in a row;
- ``args.json``: the training arguments.

A checkpoint is written into a temporary sibling directory and renamed into place, so a
``checkpoint-STEP`` directory is always complete (a kill at any moment leaves at most a
``.checkpoint-*.tmp`` directory, removed by the next save). The data order is a function
of the seed and epoch and the RNG states are restored, so a resumed run repeats the
uninterrupted one bit for bit.

Example:
    >>> latest_checkpoint("/nonexistent") is None
    True
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from typing import Optional

import torch

from ..fileio import make_temp_dir

_NAME = re.compile(r"^checkpoint-(\d+)$")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy
        numpy.random.set_state(state["numpy"])


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files + [""]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def list_checkpoints(out_dir: str) -> list:
    """``[(step, path)]`` of the complete checkpoints in ``out_dir``, oldest first.

    Example:
        >>> list_checkpoints("/nonexistent")
        []
    """
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, e)) for e in os.listdir(out_dir)
             if (m := _NAME.match(e)) and os.path.isfile(os.path.join(out_dir, e, "state.json"))]
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The newest complete ``checkpoint-STEP`` directory in ``out_dir``, or None.

    Example:
        >>> import tempfile; latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, args: dict,
                    keep: Optional[int] = None, base_model_name_or_path: Optional[str] = None) -> str:
    """Write ``out_dir/checkpoint-STEP`` atomically (see the module docstring); keep the
    newest ``keep`` checkpoints (all when None). Returns the checkpoint's path.

    Example (needs a prepared model and its optimizer):
        save_checkpoint("runs/x", 10, model, opt, {"step": 10}, vars(args), keep=3)
    """
    import qlora_kernels as qk

    os.makedirs(out_dir, exist_ok=True)
    for e in os.listdir(out_dir):  # leftovers of saves killed halfway
        if e.startswith(".checkpoint-") and e.endswith(".tmp"):
            shutil.rmtree(os.path.join(out_dir, e), ignore_errors=True)
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = make_temp_dir(out_dir, f".checkpoint-{step}-", ".tmp")
    try:
        qk.save_adapter(model, os.path.join(tmp, "adapter"), base_model_name_or_path)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(_rng_state(), os.path.join(tmp, "rng.pt"))
        for name, obj in (("args.json", args), ("state.json", dict(state, step=step))):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
                f.write("\n")
        _fsync_tree(tmp)
        if os.path.isdir(final):  # the same step again (e.g. the stop after bad steps)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_args(path: str) -> dict:
    """The training arguments a checkpoint was written with.

    Example (needs a checkpoint):
        read_checkpoint_args("runs/x/checkpoint-10")["seed"]
    """
    with open(os.path.join(path, "args.json"), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restore the adapter, the optimizer state and the RNG states from checkpoint
    ``path`` into ``model`` and ``optimizer``; return its ``state.json``.

    Example (needs a prepared model and its optimizer):
        state = load_checkpoint(latest_checkpoint("runs/x"), model, opt)
    """
    import qlora_kernels as qk

    qk.load_adapter(model, os.path.join(path, "adapter"))
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device,
                                         weights_only=True))
    _set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)
