"""CPU backend: the compiled kernels of csrc/cpu (OpenMP, AVX2 with a scalar fallback),
reached through ``torch.ops.qlora_kernels``.

Example:
    >>> import torch
    >>> from qlora_kernels.backends import cpu
    >>> cpu.quantize_4bit(torch.randn(64), 64, "nf4")[0].shape
    torch.Size([32, 1])
"""
from ..native import (dequantize_4bit, dequantize_4bit_out, dequantize_8bit,  # noqa: F401
                      gemv_4bit, quantize_4bit, quantize_8bit)

DEVICE_TYPE = "cpu"
