"""Optimizer state in CUDA unified (managed) memory, with an ordinary-memory fallback.

Large states (``numel >= PAGED_MIN_NUMEL``) of CUDA params go to memory from
``cudaMallocManaged`` (op ``qlora_kernels::managed_empty``): the driver pages it to host
memory when the GPU runs short, and ``prefetch_`` moves it back before its update (only
on devices that report concurrent managed access). Small states stay in ordinary memory.
Where managed memory is unavailable (no CUDA, a CPU-only build, a device without managed
memory or without concurrent managed access, e.g. Windows/WSL and some Jetsons, where
nothing would page), ``paged=True`` falls back to ordinary memory, the state stays resident
on the GPU, and the optimizer warns once. A state that would not fit in free GPU memory is
refused with a clear error: paged state never oversubscribes the GPU.

Example:
    >>> import torch
    >>> from qlora_kernels.optim import paged
    >>> t = paged.state_zeros((10,), torch.float32, "cpu", paged=False)
    >>> paged.is_paged(t)
    False
"""
from __future__ import annotations

import math

import torch

PAGED_MIN_NUMEL = 100_000  # below this, paging saves little and costs a page-fault round trip


def _op(name):
    return getattr(torch.ops.qlora_kernels, name)


def _index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def managed_supported(device) -> bool:
    """Whether ``device`` can hold managed optimizer state (a CUDA device, a CUDA build,
    and a device that reports managed memory and concurrent managed access).

    Example:
        >>> managed_supported("cpu")
        False
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(_op("managed_supported")(_index(device)))
    except (NotImplementedError, RuntimeError):  # no kernel in this build
        return False


def fallback_reason(device) -> str | None:
    """Why paged state on ``device`` would fall back to ordinary memory (None if it won't)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"params are on {device.type}, and unified memory needs a CUDA device"
    if not managed_supported(device):
        return (f"{device} has no CUDA managed memory with concurrent managed access (e.g. "
                "Windows/WSL, some Jetsons: no on-demand paging), or this build of "
                "qlora_kernels has no managed-memory ops; the state stays resident on the GPU")
    return None


def state_zeros(shape, dtype: torch.dtype, device, paged: bool,
                min_numel: int = PAGED_MIN_NUMEL) -> torch.Tensor:
    """A zero state tensor: managed memory when ``paged`` and large enough and supported,
    else ordinary memory on ``device``.

    Example:
        >>> state_zeros((2, 3), torch.float32, "cpu", paged=True).shape
        torch.Size([2, 3])
    """
    device = torch.device(device)
    numel = math.prod(shape)
    if paged and numel >= min_numel and managed_supported(device):
        # managed_empty raises a clear error when the request exceeds free GPU memory
        return _op("managed_empty")(list(shape), dtype, _index(device)).zero_()
    return torch.zeros(shape, dtype=dtype, device=device)


def is_paged(t: torch.Tensor) -> bool:
    """True when ``t`` lives in CUDA managed memory.

    Example:
        >>> is_paged(torch.zeros(3))
        False
    """
    if not t.is_cuda:
        return False
    try:
        return bool(_op("is_managed")(t))
    except (NotImplementedError, RuntimeError):
        return False


def prefetch_(tensors, device) -> None:
    """Ask the driver to move the managed tensors among ``tensors`` (a tensor or a list) to
    ``device``, a CUDA device or "cpu" for host memory; one call for the whole list. A no-op
    for ordinary memory and on devices without concurrent managed access, where prefetching
    is not allowed.

    Example:
        >>> import torch
        >>> prefetch_([torch.zeros(3)], "cpu")  # ordinary memory: nothing to move
    """
    if torch.is_tensor(tensors):
        tensors = [tensors]
    tensors = [t for t in tensors if t.is_cuda and t.numel() > 0]
    if tensors:
        device = torch.device(device)
        _op("managed_prefetch_")(tensors, _index(device) if device.type == "cuda" else -1)
