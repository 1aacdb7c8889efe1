"""Fine-tuning as commands: ``qlora-kernels train`` (command.py, with the one training
loop in loop.py, data formats in data.py, checkpoints and exact resume in checkpoint.py,
options and their checks in args.py), ``merge`` (merge.py) and ``generate`` (generate.py).
The demo (``qlora_kernels.demo``) runs the same loop with its preset.

Example:
    >>> from qlora_kernels.train import LoopConfig, lr_at
    >>> LoopConfig(steps=3).steps, lr_at(1, 3, 1.0, 1)
    (3, 1.0)
"""
from .args import UsageError, add_train_arguments
from .loop import LoopConfig, lr_at, train

__all__ = ["LoopConfig", "UsageError", "add_train_arguments", "lr_at", "train"]
