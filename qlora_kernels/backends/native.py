"""Thin wrappers over ``torch.ops.qlora_kernels``: the dispatcher picks the compiled CPU or
CUDA kernel by the tensors' device. Shared by the ``cpu`` and ``cuda`` backends.

Example:
    >>> import torch
    >>> from qlora_kernels.backends.native import quantize_4bit
    >>> quantize_4bit(torch.randn(10), 64, "fp4")[1].shape
    torch.Size([1])
"""
import torch


def quantize_4bit(A, blocksize, quant_type):
    return torch.ops.qlora_kernels.quantize_4bit(A, blocksize, quant_type)


def dequantize_4bit(packed, absmax, code, blocksize, numel, dtype,
                    nested_absmax=None, nested_code=None, offset=0.0):
    return torch.ops.qlora_kernels.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype,
                                                   nested_absmax, nested_code, float(offset))


def dequantize_4bit_out(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, out):
    torch.ops.qlora_kernels.dequantize_4bit_out(packed, absmax, code, blocksize, nested_absmax,
                                                nested_code, float(offset), out)


def quantize_8bit(A, code, blocksize):
    return torch.ops.qlora_kernels.quantize_8bit(A, code, blocksize)


def dequantize_8bit(q, absmax, code, blocksize, dtype):
    return torch.ops.qlora_kernels.dequantize_8bit(q, absmax, code, blocksize, dtype)


def gemv_4bit(x, packed, absmax, code, blocksize, out_features, nested_absmax=None,
              nested_code=None, offset=0.0, bias=None):
    return torch.ops.qlora_kernels.gemv_4bit(x, packed, absmax, code, blocksize, out_features,
                                             nested_absmax, nested_code, float(offset), bias)
