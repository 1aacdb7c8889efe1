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
import warnings

from .peft_dispatch import (KNOWN_PEFT_VERSIONS, all_linear_names, install_peft_shim,
                            lora_linear4bit_class, register_with)
from .quantizer import (QLoRAKernelsHfQuantizer, QuantizationConfig, quantize_weight)


def _install_shim_at_import() -> bool:
    # A PEFT the shim was not checked against must not make the quantizer unusable: the
    # shim stays out with one warning (install_peft_shim() itself raises the same message).
    if os.environ.get("QLORA_KERNELS_NO_PEFT_SHIM"):
        return False
    try:
        return install_peft_shim()
    except RuntimeError as exc:
        warnings.warn(f"{exc}; get_peft_model will not wrap Linear4bit layers", RuntimeWarning,
                      stacklevel=3)
        return False


PEFT_SHIM_INSTALLED = _install_shim_at_import()

__all__ = ["QuantizationConfig", "QLoRAKernelsHfQuantizer", "quantize_weight", "register_with",
           "install_peft_shim", "all_linear_names", "lora_linear4bit_class",
           "KNOWN_PEFT_VERSIONS", "PEFT_SHIM_INSTALLED"]
