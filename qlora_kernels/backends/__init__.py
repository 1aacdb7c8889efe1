"""Backend selection: ``cuda``, ``triton``, ``cpu`` or ``torch`` (the reference).

A backend is chosen per call: the ``backend=`` argument, else the environment variable
``QLORA_KERNELS_BACKEND``, else the best one available for the tensor's device
(CUDA kernels, then Triton, then the reference on GPUs; the CPU kernels, then the
reference on CPUs). Every backend module exposes the same functions with the
signatures of the ``qlora_kernels::*`` op schemas.

Example:
    >>> import torch
    >>> from qlora_kernels.backends import get_backend
    >>> get_backend(torch.device("cpu"), "torch").__name__
    'qlora_kernels.backends.torch'
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

# Aliased: the submodule `backends.torch` (the reference) would shadow the name `torch`.
import torch as _torch

from .. import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "QLORA_KERNELS_BACKEND"


def triton_available(device_type: str) -> bool:
    """Triton runs on CUDA devices, and on the CPU only through its interpreter."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if device_type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device_type: str) -> list[str]:
    """Backends usable for tensors on ``device_type`` ("cpu" or "cuda"), best first.

    Example:
        >>> "torch" in available_backends("cpu")
        True
    """
    out = []
    if device_type == "cuda" and _extension.cuda_kernels_runnable():
        out.append("cuda")
    if device_type == "cuda" and triton_available(device_type):
        out.append("triton")
    if device_type == "cpu" and _extension.EXTENSION_LOADED:
        out.append("cpu")
    out.append("torch")
    # Interpreted Triton on the CPU is for tests, never the default: it goes last.
    if device_type == "cpu" and triton_available(device_type):
        out.append("triton")
    return out


def resolve_backend_name(device: _torch.device, backend: str | None = None) -> str:
    """The backend name a call on ``device`` uses (see the module docstring)."""
    device_type = _torch.device(device).type
    name = backend or os.environ.get(ENV_VAR) or None
    if name is None:
        return available_backends(device_type)[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS}")
    if name not in available_backends(device_type):
        why = {
            "cuda": "the extension was built without CUDA kernels, or the tensor is not on a GPU",
            "cpu": "the compiled extension is not loaded, or the tensor is not on the CPU",
            "triton": "triton is not installed (on the CPU it also needs TRITON_INTERPRET=1)",
        }.get(name, "")
        raise RuntimeError(f"backend {name!r} is not available for {device_type} tensors: {why}")
    return name


def get_backend(device: _torch.device, backend: str | None = None) -> ModuleType:
    """The backend module for ``device`` (see ``resolve_backend_name``)."""
    name = resolve_backend_name(device, backend)
    return importlib.import_module(f"{__name__}.{name}")
