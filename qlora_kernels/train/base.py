"""The 4-bit base model and tokenizer for ``train``, ``merge`` and ``generate``: any local
transformers directory or GGUF file ``qk.from_pretrained`` loads (a GGUF file through its
converted copy, cached by ``qlora_kernels.demo.model``, which also holds its tokenizer).

Example (needs transformers and a model):
    model, tok = load_base("path/to/model", compute_dtype="float32", device="cpu")
"""
from __future__ import annotations

import re
from typing import Optional

import torch


def load_tokenizer(model_dir: str):
    """The model's tokenizer, with a pad token (the end-of-sequence one when it has none).

    Example (needs transformers and a model):
        tok = load_tokenizer("path/to/model")
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model: str, compute_dtype: str = "float32", device: str = "cpu",
              layers: Optional[int] = None):
    """``(model, tokenizer)``: every linear layer but the output head in NF4 + double
    quantization (``qk.from_pretrained``), other weights in ``compute_dtype``, on
    ``device``; ``layers`` keeps the first N decoder layers. No adapter yet.

    Example (needs transformers and a model):
        model, tok = load_base("model.gguf", layers=2)
    """
    import qlora_kernels as qk
    from transformers.utils import logging as hf_logging

    from ..demo.model import require_demo_packages, truncate_layers
    from .args import converted_dir, linear_names_on_disk

    require_demo_packages()
    hf_logging.set_verbosity_error()
    model_dir = converted_dir(model)
    tok = load_tokenizer(model_dir)
    skip = None
    if layers is not None:  # the layers dropped below: not worth quantizing
        skip = [n for n in linear_names_on_disk(model_dir) or []
                if (m := re.search(r"\.layers\.(\d+)\.", n)) and int(m.group(1)) >= layers]
    lm = qk.from_pretrained(model_dir, compute_dtype=getattr(torch, compute_dtype),
                            device=device, progress=False, skip_modules=skip)
    if layers is not None:
        truncate_layers(lm, layers)
    lm.eval()
    return lm, tok
