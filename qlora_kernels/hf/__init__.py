"""The Hugging Face stack on qlora_kernels: importing this package registers
``QuantizationConfig`` (``quant_method="qlora_kernels"``) with transformers and, when peft
is installed, teaches PEFT's LoRA to wrap our ``Linear4bit`` (see peft_dispatch.py; set
``QLORA_KERNELS_NO_PEFT_SHIM=1`` to skip that and use ``register_with`` per config).
``import qlora_kernels`` alone never imports transformers or peft.

Example (needs transformers):
    >>> import qlora_kernels.hf as qkhf
    >>> qkhf.QuantizationConfig().quant_method
    'qlora_kernels'
"""
import os

from .peft_dispatch import (KNOWN_PEFT_VERSIONS, all_linear_names, install_peft_shim,
                            lora_linear4bit_class, register_with)
from .quantizer import (QLoRAKernelsHfQuantizer, QuantizationConfig, quantize_weight)

PEFT_SHIM_INSTALLED = (not os.environ.get("QLORA_KERNELS_NO_PEFT_SHIM")) and install_peft_shim()

__all__ = ["QuantizationConfig", "QLoRAKernelsHfQuantizer", "quantize_weight", "register_with",
           "install_peft_shim", "all_linear_names", "lora_linear4bit_class",
           "KNOWN_PEFT_VERSIONS", "PEFT_SHIM_INSTALLED"]
