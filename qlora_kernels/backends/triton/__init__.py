"""Triton backend: the kernels of qlora_kernels/triton/ registered as the ``qlora_kernels``
ops. On GPUs they stand in for kernels a build lacks (``stand_in_impls``); selected with
``qk.use_backend("triton")`` they serve every op (``override_impls``), on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, for tests). The 8-bit AdamW step has no Triton
kernel and takes the reference's.

Example:
    >>> from qlora_kernels.backends import triton as tb    # doctest: +SKIP
    >>> sorted(tb.stand_in_impls())[:2]                      # doctest: +SKIP
    ['dequantize_4bit', 'dequantize_4bit_out']
"""
from functools import partial

import torch

from ...triton import (dequantize_4bit, dequantize_4bit_out, dequantize_8bit, quantize_4bit,
                       quantize_8bit)
from ...triton import matmul_4bit_triton
from ...triton.adamw import adamw_step_
from .. import reference


def stand_in_impls() -> dict:
    """op name -> Triton function, for CUDA tensors of a build without CUDA kernels (the
    reference stands in for the other ops there)."""
    return {"quantize_4bit": quantize_4bit, "dequantize_4bit": dequantize_4bit,
            "dequantize_4bit_out": dequantize_4bit_out, "quantize_8bit": quantize_8bit,
            "dequantize_8bit": dequantize_8bit, "adamw_step_": adamw_step_}


def matmul_4bit(x, packed, absmax, code, blocksize, out_features, nested_absmax=None,
                nested_code=None, offset=0.0, bias=None):
    """The op ``matmul_4bit`` (and ``gemv_4bit``) through the Triton GEMM, any row count."""
    # bias added in the kernel's float32 sum: rounded once, as on every other path
    return matmul_4bit_triton(x, packed, absmax, code, blocksize, out_features, x.shape[-1],
                              nested_absmax, nested_code, offset, bias=bias)


def matmul_4bit_backward(grad_y, packed, absmax, code, blocksize, in_features,
                         nested_absmax=None, nested_code=None, offset=0.0):
    return matmul_4bit_triton(grad_y, packed, absmax, code, blocksize, grad_y.shape[-1],
                              in_features, nested_absmax, nested_code, offset, transpose_w=True)


def override_impls() -> dict:
    """op name -> implementation of every compute op while Triton is selected."""
    out = stand_in_impls()
    out.update(gemv_4bit=matmul_4bit, matmul_4bit=matmul_4bit,
               matmul_4bit_backward=matmul_4bit_backward,
               adamw_step_multi_=partial(reference.adamw.adamw_step_multi_, update=adamw_step_),
               adamw8bit_step_=reference.adamw.adamw8bit_step_)
    return out
