"""Triton kernels of qlora_kernels, one op per module (kernels first, then launchers):

- quantize_4bit:    NF4 / FP4 / INT4 blockwise quantization and packing
- dequantize_4bit:  dequantization, double-quantized absmax decoded in the same kernel
- blockwise_8bit:   8-bit blockwise quantization with a sorted 256-entry code, and back
- matmul_4bit:      tiled GEMM x @ W^T (and x @ W) that dequantizes W tiles in registers

They run on CUDA GPUs, and on the CPU through Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported), which the tests use. Quantize and dequantize are
bit-exact with the reference backend (qlora_kernels.backends.reference).

Example:
    >>> import torch
    >>> from qlora_kernels.triton import quantize_4bit
    >>> quantize_4bit(torch.randn(65), 64, "nf4")[0].shape   # doctest: +SKIP
    torch.Size([33, 1])
"""
from .blockwise_8bit import dequantize_8bit, quantize_8bit
from .dequantize_4bit import dequantize_4bit, dequantize_4bit_out
from .matmul_4bit import matmul_4bit_triton
from .quantize_4bit import quantize_4bit

__all__ = ["quantize_4bit", "dequantize_4bit", "dequantize_4bit_out", "quantize_8bit",
           "dequantize_8bit", "matmul_4bit_triton"]
