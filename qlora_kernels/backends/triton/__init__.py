"""Triton backend: the kernels of qlora_kernels/triton/ behind the op signatures, plus
``matmul_4bit`` (the 4-bit GEMM). On the CPU it runs only through Triton's interpreter
(TRITON_INTERPRET=1), which the tests use; on a GPU each launch goes to the tensor's
device and that device's current stream.

Example:
    >>> import torch
    >>> from qlora_kernels.backends import triton as tb     # doctest: +SKIP
    >>> tb.quantize_4bit(torch.randn(100), 64, "nf4")[1].shape  # doctest: +SKIP
    torch.Size([2])
"""
from ...triton import (dequantize_4bit, dequantize_4bit_out, dequantize_8bit, quantize_4bit,
                       quantize_8bit)
from ...triton import matmul_4bit_triton as matmul_4bit

DEVICE_TYPE = "cuda"

__all__ = ["quantize_4bit", "dequantize_4bit", "dequantize_4bit_out", "quantize_8bit",
           "dequantize_8bit", "matmul_4bit", "DEVICE_TYPE"]
