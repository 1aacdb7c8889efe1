"""CUDA backend: the compiled kernels of csrc/cuda, reached through
``torch.ops.qlora_kernels`` on CUDA tensors.

Example:
    >>> import torch
    >>> from qlora_kernels.backends import cuda
    >>> if torch.cuda.is_available():
    ...     cuda.quantize_4bit(torch.randn(64, device="cuda"), 64, "nf4")[0].shape
"""
from ..native import (dequantize_4bit, dequantize_4bit_out, dequantize_8bit,  # noqa: F401
                      gemv_4bit, quantize_4bit, quantize_8bit)

DEVICE_TYPE = "cuda"
