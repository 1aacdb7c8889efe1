"""The packed 4-bit bytes stored as another dtype (``quant_storage``), for FSDP: it shards and
all-gathers a parameter group in one dtype, so the 4-bit weight can take the dtype of the
parameters beside it. The bytes are the same; only their view changes.

Example:
    >>> import torch
    >>> from qlora_kernels.packed_storage import packed_to_storage, storage_to_packed
    >>> w = packed_to_storage(torch.arange(6, dtype=torch.uint8).view(6, 1), torch.float16)
    >>> storage_to_packed(w, 6).flatten().tolist()
    [0, 1, 2, 3, 4, 5]
"""
from __future__ import annotations

import torch

# dtypes the packed bytes may be viewed as (``quant_storage``): FSDP shards a parameter
# group in one dtype, so the 4-bit weight can take the dtype of the parameters beside it.
QUANT_STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def check_storage(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if the packed bytes may be stored as it, else ValueError.

    Example:
        >>> check_storage(torch.bfloat16)
        torch.bfloat16
    """
    if dtype not in QUANT_STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {QUANT_STORAGE_DTYPES}, got {dtype}")
    return dtype


def packed_to_storage(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The packed uint8 bytes ``(nbytes, 1)`` viewed as ``dtype``: shape ``(ceil(nbytes /
    itemsize), 1)``, the tail padded with zero bytes when ``nbytes`` is not a multiple.
    No copy when no padding is needed.

    Example:
        >>> import torch
        >>> packed_to_storage(torch.arange(5, dtype=torch.uint8).view(5, 1), torch.bfloat16).shape
        torch.Size([3, 1])
    """
    check_storage(dtype)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weight: expected uint8, got {packed.dtype}")
    if dtype == torch.uint8:
        return packed
    flat = packed.reshape(-1)
    pad = (-flat.numel()) % dtype.itemsize
    if pad or flat.storage_offset() % dtype.itemsize:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(dtype).view(-1, 1)


def storage_to_packed(weight: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Inverse of ``packed_to_storage``: the first ``nbytes`` bytes of ``weight`` as the uint8
    ``(nbytes, 1)`` tensor of the bitsandbytes layout (a view, no copy).

    Example:
        >>> import torch
        >>> w = packed_to_storage(torch.arange(5, dtype=torch.uint8).view(5, 1), torch.float32)
        >>> storage_to_packed(w, 5).flatten().tolist()
        [0, 1, 2, 3, 4]
    """
    if weight.dtype == torch.uint8:
        return weight if weight.shape == (nbytes, 1) else weight.reshape(-1)[:nbytes].view(nbytes, 1)
    flat = weight.reshape(-1).view(torch.uint8)
    if not nbytes <= flat.numel() < nbytes + weight.element_size():
        raise ValueError(f"packed weight: {weight.numel()} {weight.dtype} values hold "
                         f"{flat.numel()} bytes, expected {nbytes} (+ padding below one value)")
    return flat[:nbytes].view(nbytes, 1)


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2-sharded parameter), without
    importing torch.distributed."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")
