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
from . import cpu_dispatch, optim
from .backends import (available_backends, current_backend, resolve_backend_name, set_backend,
                       use_backend)
from .formats import dynamic_map, fp8_e4m3_map, get_4bit_code, nf4_from_normal_quantiles
from .functional import (dequantize_4bit, dequantize_absmax, dequantize_blockwise,
                         double_quantize_absmax, quantize_4bit, quantize_blockwise)
from .matmul import matmul_4bit, set_gemv_max_rows
from .gemv_calibration import calibrate_gemv
from .memory import bits_per_parameter, cpu_block_cache, cpu_block_cache_stats, estimate_memory
from .nn import Linear4bit
from .quant_state import QuantState
from .serialization import load_quantized, save_quantized, split_quantized
from .lora import QLoRALinear
from .prepare import merge_lora, prepare_model
from .adapters import load_adapter, save_adapter
from .loading import CheckpointError, from_pretrained, save_pretrained
from .system_info import info

backends.apply_environment()  # QLORA_KERNELS_BACKEND, once every op is registered

__version__ = "0.1.0"
EXTENSION_LOADED = _extension.EXTENSION_LOADED

__all__ = [
    "Linear4bit", "QuantState", "available_backends", "matmul_4bit", "set_gemv_max_rows", "calibrate_gemv", "bits_per_parameter", "estimate_memory", "cpu_block_cache", "cpu_block_cache_stats",
    "load_quantized", "save_quantized", "split_quantized", "dequantize_4bit", "dequantize_absmax",
    "dequantize_blockwise", "double_quantize_absmax", "dynamic_map", "fp8_e4m3_map",
    "get_4bit_code", "nf4_from_normal_quantiles", "quantize_4bit", "quantize_blockwise",
    "resolve_backend_name", "set_backend", "use_backend", "current_backend",
    "QLoRALinear", "prepare_model", "merge_lora", "save_adapter", "load_adapter", "info",
    "from_pretrained", "save_pretrained", "CheckpointError",
]
