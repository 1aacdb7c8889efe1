"""Loads the compiled ``qlora_kernels._C`` tolerantly.

When the extension is missing, fails to load, or was built for another torch than the one
running, one warning is issued and the package falls back to the pure-PyTorch reference
ops (registered under the same op names by ``qlora_kernels.ops``), so
``import qlora_kernels`` never fails for want of a build and never loads a stale one.
setup.py writes ``_build_info.json`` beside the extension with the torch it was built
against; it is checked before the library is loaded (a library built for another torch
can load and then misbehave, so loading it to ask would be too late).

Example:
    >>> from qlora_kernels import _extension
    >>> isinstance(_extension.EXTENSION_LOADED, bool)
    True
"""
from __future__ import annotations

import json
import os
import warnings

import torch

EXTENSION_LOADED = False
LOAD_ERROR: str | None = None
BUILD_INFO: dict | None = None
_HERE = os.path.dirname(os.path.abspath(__file__))
REBUILD_HINT = "Rebuild it with `pip install -e .` (or `pip install .`) in this environment"


def read_build_info(path: str = os.path.join(_HERE, "_build_info.json")) -> dict | None:
    """The build record setup.py wrote beside the extension (None when there is none)."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def build_mismatch(info: dict | None) -> str | None:
    """Why a build with record ``info`` must not be loaded into the running torch.

    Example:
        >>> import torch
        >>> build_mismatch({"torch": "0.0.1", "torch_git": "x"})[:33]
        'it was built against torch 0.0.1,'
        >>> build_mismatch({"torch": torch.__version__, "torch_git": torch.version.git_version}) is None
        True
    """
    if info is None:
        return "it has no build record (_build_info.json), so the torch it was built against is unknown"
    built = (info.get("torch"), info.get("torch_git"))
    if built != (torch.__version__, torch.version.git_version):
        return (f"it was built against torch {built[0]}, but torch {torch.__version__} is running")
    return None


def _load() -> None:
    global EXTENSION_LOADED, LOAD_ERROR, BUILD_INFO
    if os.environ.get("QLORA_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
        LOAD_ERROR = "disabled by QLORA_KERNELS_NO_EXTENSION"
        return
    BUILD_INFO = read_build_info()
    built = any(name.startswith("_C.") and name.endswith((".so", ".pyd")) for name in os.listdir(_HERE))
    why = build_mismatch(BUILD_INFO) if built else (
        "it was not built (setup.py prints why: no C++ compiler with OpenMP, or no torch at install)")
    if why is None:
        try:
            from . import _C  # noqa: F401  (registers the ops through static initializers)

            EXTENSION_LOADED = True
            return
        except Exception as exc:  # an undefined symbol from a broken build, say
            why = f"it failed to load ({type(exc).__name__}: {exc})"
    LOAD_ERROR = why
    warnings.warn(f"qlora_kernels: not using the compiled extension qlora_kernels._C: {why}. "
                  f"Using the pure-PyTorch reference ops (slower). {REBUILD_HINT}.",
                  RuntimeWarning, stacklevel=3)


_load()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``qlora_kernels::<op>`` has a kernel registered for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora_kernels::{op}", dispatch_key)


# Read before qlora_kernels.ops registers its Triton/reference stand-ins for CUDA tensors,
# which would otherwise make the check below true on a CPU-only build.
_CUDA_KERNELS_BUILT = EXTENSION_LOADED and has_kernel("dequantize_4bit", "CUDA")


def cuda_kernels_built() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _CUDA_KERNELS_BUILT


if (EXTENSION_LOADED and not _CUDA_KERNELS_BUILT and torch.cuda.is_available()
        and BUILD_INFO and BUILD_INFO.get("cuda_skipped")):
    warnings.warn("qlora_kernels: a CUDA device is present but the extension was built without "
                  f"its CUDA kernels ({BUILD_INFO['cuda_skipped']}); CUDA tensors use the Triton "
                  f"kernels or the reference. {REBUILD_HINT} once that is fixed.",
                  RuntimeWarning, stacklevel=2)


# A build for other archs, without PTX the driver can compile for this one.
_NO_IMAGE_ERRORS = ("no kernel image is available", "invalid device function")
_runnable: dict[int, bool] = {}
_replaced = False


def _probe_launch(device: torch.device) -> None:
    torch.ops.qlora_kernels.quantize_4bit(torch.ones(64, device=device), 64, "nf4")


def cuda_kernels_runnable(device=None) -> bool:
    """True when the compiled CUDA kernels run on ``device`` (a CUDA device; default the
    current one). Probed once per device, at first use, by launching one tiny kernel: when
    the build has no image for the GPU (e.g. sm_75 or sm_100 against an sm_80..90 build
    without PTX), one warning is issued and every op on CUDA tensors goes to the Triton
    kernels (or the reference) from then on, on every device.

    Example:
        >>> cuda_kernels_runnable() if not cuda_kernels_built() else True
        False
    """
    global _replaced
    if not _CUDA_KERNELS_BUILT or _replaced:
        return False
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else \
        torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _runnable:
        try:
            _probe_launch(torch.device("cuda", index))
            _runnable[index] = True
        except RuntimeError as exc:
            if not any(s in str(exc) for s in _NO_IMAGE_ERRORS):
                raise
            _runnable[index] = False
            _replaced = True
            cap = torch.cuda.get_device_capability(index)
            warnings.warn(
                f"qlora_kernels: the compiled CUDA kernels have no image for cuda:{index} "
                f"(sm_{cap[0]}{cap[1]}): {exc}. Using the Triton kernels (or the PyTorch "
                "reference) for CUDA tensors instead; rebuild with "
                f"QLORA_KERNELS_CUDA_ARCHS={cap[0]}.{cap[1]} for the compiled ones.",
                RuntimeWarning, stacklevel=2)
            from . import ops
            ops.replace_cuda_kernels()
    return _runnable[index] and not _replaced
