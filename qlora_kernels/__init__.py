"""qlora-kernels: QLoRA kernels — NF4/FP4 blockwise quantization with double-quantized
scales, in CUDA, Triton and vectorized CPU C++, each checked against a PyTorch reference.

Example:
    >>> import torch, qlora_kernels as qk
    >>> w = torch.randn(512, 512, dtype=torch.bfloat16)
    >>> packed, state = qk.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=False)
    >>> qk.dequantize_4bit(packed, state).shape
    torch.Size([512, 512])
"""
from . import _extension
from . import ops  # noqa: F401  (fake kernels and fallbacks)
from . import optim
from .backends import available_backends, resolve_backend_name
from .formats import dynamic_map, fp8_e4m3_map, get_4bit_code, nf4_from_normal_quantiles
from .functional import (dequantize_4bit, dequantize_absmax, dequantize_blockwise,
                         double_quantize_absmax, quantize_4bit, quantize_blockwise)
from .quant_state import QuantState

__version__ = "0.1.0"
EXTENSION_LOADED = _extension.EXTENSION_LOADED

__all__ = [
    "QuantState", "available_backends", "dequantize_4bit", "dequantize_absmax",
    "dequantize_blockwise", "double_quantize_absmax", "dynamic_map", "fp8_e4m3_map",
    "get_4bit_code", "nf4_from_normal_quantiles", "quantize_4bit", "quantize_blockwise",
    "resolve_backend_name",
]
