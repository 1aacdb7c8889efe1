"""Which implementation of each ``qlora_kernels::*`` op runs: the torch dispatcher decides.

Default (no override), by the tensors' device: the compiled CPU and CUDA kernels
(csrc/, registered from C++); on CUDA tensors of a build without CUDA kernels, the Triton
kernels (``backends/triton``) and the reference for ops Triton lacks; without the
compiled extension, the reference (``backends/reference``) everywhere.

Override: the environment variable ``QLORA_KERNELS_BACKEND`` (read at import),
``set_backend(name)`` or ``with use_backend(name):``. The chosen backend's implementation
of every op (quantize, dequantize, 8-bit, gemv, matmul and its backward, the optimizer
steps) is registered for the CPU and CUDA dispatch keys on top of the default kernels, in a
``torch.library.Library`` that is destroyed when the override ends, so the default kernels
come back. ``"cpu"`` and ``"cuda"`` name the compiled kernels, i.e. no override;
``"torch"`` is accepted as another name of ``"reference"``.

Example:
    >>> import torch, qlora_kernels as qk
    >>> with qk.use_backend("torch"):
    ...     qk.current_backend()
    'reference'
    >>> qk.current_backend() is None or qk.current_backend() in qk.backends.BACKENDS
    True
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Iterator, Optional

# Aliased out of habit: a backend module must never shadow the torch package.
import torch as _torch

from .. import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
ALIASES = {"torch": "reference"}
ENV_VAR = "QLORA_KERNELS_BACKEND"
# Backends whose kernels are registered over the default ones while selected.
_OVERRIDING = ("triton", "reference")

_active_name: Optional[str] = None
_active_lib: Optional[_torch.library.Library] = None


def canonical_name(name: str) -> str:
    """The backend's name, with ``"torch"`` read as ``"reference"``; ValueError if unknown.

    Example:
        >>> canonical_name("torch")
        'reference'
    """
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS} "
                         f"(or 'torch' for 'reference')")
    return name


def triton_available(device_type: str) -> bool:
    """Triton runs on CUDA devices, and on the CPU only through its interpreter.

    Example:
        >>> triton_available("cpu") in (True, False)
        True
    """
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
        >>> "reference" in available_backends("cpu")
        True
    """
    out = []
    if device_type == "cuda" and _extension.cuda_kernels_runnable():
        out.append("cuda")
    if device_type == "cuda" and triton_available(device_type):
        out.append("triton")
    if device_type == "cpu" and _extension.EXTENSION_LOADED:
        out.append("cpu")
    out.append("reference")
    # Interpreted Triton on the CPU is for tests, never the default: it goes last.
    if device_type == "cpu" and triton_available(device_type):
        out.append("triton")
    return out


def resolve_backend_name(device: _torch.device, backend: Optional[str] = None) -> str:
    """The backend a call on ``device`` runs on: ``backend``, else the active override, else
    the device's default; RuntimeError when that backend is not available there.

    Example:
        >>> import torch
        >>> resolve_backend_name(torch.device("cpu"), "torch")
        'reference'
    """
    device_type = _torch.device(device).type
    name = backend or _active_name
    if name is None:
        return available_backends(device_type)[0]
    name = canonical_name(name)
    if name not in available_backends(device_type):
        why = {
            "cuda": "the extension was built without CUDA kernels, or the tensor is not on a GPU",
            "cpu": "the compiled extension is not loaded, or the tensor is not on the CPU",
            "triton": "triton is not installed (on the CPU it also needs TRITON_INTERPRET=1)",
        }.get(name, "")
        raise RuntimeError(f"backend {name!r} is not available for {device_type} tensors: {why}")
    return name


def _override_keys(name: str) -> list[str]:
    keys = ["CUDA"]
    if name == "reference" or triton_available("cpu"):
        keys.append("CPU")
    return keys


def set_backend(name: Optional[str]) -> None:
    """Route every op through backend ``name`` from now on (None: back to the default).

    Example:
        >>> import qlora_kernels as qk
        >>> qk.set_backend("reference"); qk.current_backend()
        'reference'
        >>> qk.set_backend(None); qk.current_backend() is None
        True
    """
    global _active_name, _active_lib
    name = None if name is None else canonical_name(name)
    if name == _active_name:
        return
    if name == "cpu" and not _extension.EXTENSION_LOADED:
        raise RuntimeError("backend 'cpu': the compiled extension is not loaded")
    if name == "cuda" and not _extension.cuda_kernels_built():
        raise RuntimeError("backend 'cuda': the extension was built without CUDA kernels")
    if name == "triton" and not (triton_available("cpu") or
                                 (triton_available("cuda") and _torch.cuda.is_available())):
        raise RuntimeError("backend 'triton': triton is not installed (on the CPU it also "
                           "needs TRITON_INTERPRET=1)")
    from .. import ops  # the schemas exist before anything is registered
    module = importlib.import_module(f"{__name__}.{name}") if name in _OVERRIDING else None
    # Old registrations go before new ones are made: torch 2.11 refuses a second Python
    # kernel for the same op and key (the stand-ins of ops.py, or the previous override).
    if _active_lib is not None:
        _active_lib._destroy()
    _active_name, _active_lib = name, None
    if module is None:
        ops.resume_cuda_stand_ins()
        return
    ops.suspend_cuda_stand_ins()
    lib = _torch.library.Library("qlora_kernels", "IMPL")
    try:
        with warnings.catch_warnings():  # overriding the default kernels is the point
            warnings.filterwarnings("ignore", message=".*[Oo]verrid")
            for key in _override_keys(name):
                for op, fn in module.override_impls().items():
                    lib.impl(op, fn, key)
    except BaseException:
        lib._destroy()
        _active_name = None
        ops.resume_cuda_stand_ins()
        raise
    _active_lib = lib


def overriding() -> bool:
    """True while a backend's kernels are registered over the default ones.

    Example:
        >>> import qlora_kernels as qk
        >>> with qk.use_backend("reference"):
        ...     overriding()
        True
    """
    return _active_lib is not None


def current_backend() -> Optional[str]:
    """The backend selected by ``set_backend``/``use_backend``/the environment, or None.

    Example:
        >>> import qlora_kernels as qk
        >>> with qk.use_backend("reference"):
        ...     qk.current_backend()
        'reference'
    """
    return _active_name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Route every op through backend ``name`` inside the block (None: leave it as it is).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> x = torch.randn(300)
        >>> with qk.use_backend("reference"):
        ...     ref = qk.quantize_4bit(x)[0]
        >>> torch.equal(ref, qk.quantize_4bit(x)[0])
        True
    """
    if name is None or canonical_name(name) == _active_name:
        yield
        return
    saved = _active_name
    set_backend(name)
    try:
        yield
    finally:
        set_backend(saved)


def apply_environment() -> None:
    """Select the backend named by ``QLORA_KERNELS_BACKEND`` (called once, at import)."""
    name = os.environ.get(ENV_VAR) or None
    if name is not None:
        set_backend(name)


def backend_for_call(device: _torch.device, backend: Optional[str]):
    """``use_backend(backend)`` after checking ``backend`` is available on ``device``: the
    ``backend=`` argument of the public functions. None: the current routing.

    Example:
        >>> import torch
        >>> with backend_for_call(torch.device("cpu"), "torch"):
        ...     current_backend()
        'reference'
    """
    if backend is None:
        return contextlib.nullcontext()
    return use_backend(resolve_backend_name(device, backend))
