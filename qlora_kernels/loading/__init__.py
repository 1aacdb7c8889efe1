"""Checkpoints in and out: ``from_pretrained`` streams a transformers checkpoint (or a
prequantized bitsandbytes one, or a GGUF file) straight into 4-bit; ``save_pretrained``
writes the transformers + bitsandbytes layout. transformers is imported only when called.

Example:
    >>> from qlora_kernels.loading import from_pretrained, save_pretrained
    >>> callable(from_pretrained) and callable(save_pretrained)
    True
"""
from .bnb_checkpoint import save_pretrained
from .checkpoint import CheckpointError, open_checkpoint
from .stream import QuantSpec, from_pretrained, load_tensor, params_on_meta

__all__ = ["CheckpointError", "QuantSpec", "from_pretrained", "load_tensor", "open_checkpoint",
           "params_on_meta", "save_pretrained"]
