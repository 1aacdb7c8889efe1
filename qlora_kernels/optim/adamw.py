"""AdamW with fused kernels, optional paged (CUDA unified memory) state, optional 8-bit state.

``AdamW`` follows torch.optim.AdamW (decoupled weight decay, bias correction, ``maximize``;
``amsgrad`` is rejected) and keeps torch's state layout: ``step`` a float32 CPU tensor,
``exp_avg``/``exp_avg_sq`` float32 tensors shaped like the param (float32 also for bfloat16 or
float16 params, which are updated in float32 and rounded once per step). ``AdamW8bit``
stores both moments blockwise 8-bit instead (blocks of 256; signed dynamic code for the first
moment, unsigned for the second). ``Paged*`` put large states in CUDA managed memory.

Backends (``backend=``, applied as ``qk.use_backend(backend)`` around the update): "cuda"/
"cpu" (the compiled op for the param's device), "triton" (32-bit state only), "reference"
(or "torch", the pure-PyTorch reference). Default (None): the current routing, i.e.
``QLORA_KERNELS_BACKEND``/``qk.set_backend``, else the best kernels for the device.

Example:
    >>> import torch, qlora_kernels as qk
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = qk.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    >>> model(torch.randn(3, 4)).sum().backward(); opt.step(); opt.zero_grad()
    >>> opt.state[model.weight]["exp_avg"].shape
    torch.Size([2, 4])
"""
from __future__ import annotations

import itertools
import warnings

import torch

from .. import _extension
from ..backends import resolve_backend_name, use_backend
from ..backends.reference import adamw as reference
from ..formats import dynamic_map
from . import paged as paged_mod

_STATE32 = ("exp_avg", "exp_avg_sq")
_STATE8 = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
BLOCKSIZE = reference.OPTIM_BLOCKSIZE
# Paged state is updated in groups of about this much state, each prefetched just before its
# update: small enough to fit beside the model on a 24 GB card, large enough that the
# launches and prefetch calls per step stay few (40M LoRA params: 320 MB, two groups).
PAGED_GROUP_BYTES = 256 << 20


def _multi_op(device_type: str) -> bool:
    """Whether the extension has its multi-tensor AdamW kernel for ``device_type`` ("cpu" or
    "cuda"). Not a stand-in: on CUDA tensors of a CPU-only build that is the pure-torch
    reference, slower than the per-param path (which there runs the Triton kernel)."""
    if device_type == "cpu":
        return _extension.EXTENSION_LOADED and _extension.has_kernel("adamw_step_multi_", "CPU")
    return device_type == "cuda" and _extension.cuda_kernels_built()


class AdamW(torch.optim.Optimizer):
    """AdamW with a fused update kernel.

    Args beyond torch.optim.AdamW's: ``paged`` (state in CUDA unified memory), ``backend``,
    ``optim_bits`` (32 or 8), ``min_8bit_size`` (smaller params keep 32-bit state),
    ``paged_min_numel`` (smaller states stay in ordinary memory).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> w = torch.nn.Parameter(torch.randn(10))
        >>> opt = qk.optim.AdamW([w], lr=0.1)
        >>> w.grad = torch.ones(10); opt.step()
        >>> int(opt.state[w]["step"])
        1
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 paged: bool = False, backend: str | None = None, optim_bits: int = 32,
                 min_8bit_size: int = 4096,
                 paged_min_numel: int = paged_mod.PAGED_MIN_NUMEL):
        if optim_bits not in (32, 8):
            raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
        if optim_bits == 8 and backend == "triton":
            # there is no Triton 8-bit kernel; running another one under that name would hide it
            raise ValueError("8-bit AdamW has no Triton kernel: use backend='cuda', 'cpu' or "
                             "'torch' (or None for the device's compiled kernel)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        _check_hyper(defaults)
        self.paged = bool(paged)
        self.backend = backend
        self.optim_bits = optim_bits
        self.min_8bit_size = int(min_8bit_size)
        self.paged_min_numel = int(paged_min_numel)
        self._codes = {}
        super().__init__(params, defaults)
        if self.paged:
            self._warn_if_not_paged()

    # ------------------------------------------------------------------ setup
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_hyper(self.param_groups[-1])

    def _warn_if_not_paged(self) -> None:
        """One warning per optimizer when paged state will live in ordinary memory."""
        for group in self.param_groups:
            for p in group["params"]:
                why = paged_mod.fallback_reason(p.device)
                if why is not None:
                    warnings.warn(f"{type(self).__name__}: paged=True but {why}; optimizer "
                                  "state goes to ordinary memory", RuntimeWarning, stacklevel=3)
                    return

    def _code(self, device: torch.device, signed: bool) -> torch.Tensor:
        key = (device, signed)
        if key not in self._codes:
            self._codes[key] = dynamic_map(signed=signed).to(device)
        return self._codes[key]

    def _use_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _zeros(self, shape, dtype, device) -> torch.Tensor:
        return paged_mod.state_zeros(shape, dtype, device, self.paged, self.paged_min_numel)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = {"step": torch.tensor(0.0, dtype=torch.float32)}  # as torch: float32 on CPU
        if self._use_8bit(p):
            nblocks = -(-p.numel() // BLOCKSIZE)
            state["exp_avg_q"] = self._zeros(p.shape, torch.uint8, p.device)
            state["exp_avg_absmax"] = self._zeros((nblocks,), torch.float32, p.device)
            state["exp_avg_sq_q"] = self._zeros(p.shape, torch.uint8, p.device)
            state["exp_avg_sq_absmax"] = self._zeros((nblocks,), torch.float32, p.device)
        else:
            state["exp_avg"] = self._zeros(p.shape, torch.float32, p.device)
            state["exp_avg_sq"] = self._zeros(p.shape, torch.float32, p.device)
        return state

    # ------------------------------------------------------------------ step
    def _backend_name(self, device: torch.device) -> str:
        return resolve_backend_name(device, self.backend)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every param with a gradient.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> w = torch.nn.Parameter(torch.zeros(3)); opt = qk.optim.AdamW([w], lr=0.5)
            >>> w.grad = torch.ones(3); opt.step(); [round(x, 4) for x in w.detach().tolist()]
            [-0.5, -0.5, -0.5]
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with use_backend(self.backend):
            self._step_all()
        return loss

    def _step_all(self) -> None:
        # Every check before any write: a bad param, grad, state or hyperparameter anywhere
        # (lr set to a negative value after construction included) raises with every
        # param, moment and step counter as it was.
        names, multi = {}, {}  # per device type, resolved once per step
        plans, fresh = [], {}
        for group in self.param_groups:
            _check_hyper(group)
            beta1, beta2 = group["betas"]
            hyper = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                     float(group["weight_decay"]))
            batches, others = {}, []  # 32-bit params per device for the multi-tensor op; the rest
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state.get(p) or fresh.setdefault(p, self._init_state(p))
                dev = p.device.type
                if dev not in names:
                    names[dev] = self._backend_name(p.device)
                    multi[dev] = _multi_op(dev)
                if multi[dev] and "exp_avg" in state:
                    batches.setdefault(p.device, []).append((p, grad, state))
                else:
                    others.append((p, grad, state))
            steps = [reference.check_step_counter(st["step"], "optimizer state 'step'") + 1
                     for _, _, st in others]
            for (p, grad, state), step in zip(others, steps):
                self._check_update(p, grad, state, hyper, step)
            plans.append((batches, others, steps, hyper, bool(group["maximize"])))
        calls = sum(len(b) + bool(o) for b, o, *_ in plans)
        if calls > 1 or self.paged:
            # A multi-tensor call checks its whole batch before writing; with more than one
            # call, a later batch must not fail after an earlier one wrote (~2 us a param).
            for batches, _, _, hyper, _ in plans:
                for p, grad, state in itertools.chain.from_iterable(batches.values()):
                    reference.check_adamw_args(p, grad, state["exp_avg"], state["exp_avg_sq"],
                                               *hyper[:4], 1)
        for p, state in fresh.items():
            self.state[p].update(state)
        try:
            for batches, others, steps, hyper, maximize in plans:
                for device, batch in batches.items():
                    self._update_many(device, batch, hyper, maximize)
                if others:
                    torch._foreach_add_([st["step"] for _, _, st in others], 1)  # one call
                    for (p, grad, state), step in zip(others, steps):
                        self._update(p, grad, state, hyper, step, maximize)
        except Exception:
            for p in fresh:  # a lone multi-tensor call refused its batch: no new states either
                self.state.pop(p, None)
            raise

    def _check_update(self, p, grad, state, hyper, step: int) -> None:
        """The checks of the op ``_update`` will call, on every backend (writes nothing)."""
        if "exp_avg_q" in state:
            reference.check_adamw8bit_args(
                p, grad, state["exp_avg_q"], state["exp_avg_absmax"], state["exp_avg_sq_q"],
                state["exp_avg_sq_absmax"], self._code(p.device, True),
                self._code(p.device, False), *hyper[:4], step)
        else:
            reference.check_adamw_args(p, grad, state["exp_avg"], state["exp_avg_sq"],
                                       *hyper[:4], step)

    def _update_many(self, device, batch, hyper, maximize: bool) -> None:
        """Multi-tensor calls for the 32-bit params of one device, step counters included:
        per-param calls cost ~20 us each in Python (and a launch each on GPUs), and counting
        113 CPU scalars with a foreach add ~0.4 ms. One call for all, or with paged state one
        per PAGED_GROUP_BYTES of state, each after its prefetch: prefetching every state at
        once onto a GPU that is short of memory would evict the first ones again before
        their update."""
        groups = _paged_groups(batch, PAGED_GROUP_BYTES) if self.paged else [batch]
        for group in groups:
            if self.paged:
                paged_mod.prefetch_([st[key] for _, _, st in group for key in _STATE32], device)
            torch.ops.qlora_kernels.adamw_step_multi_(
                [p for p, _, _ in group], [g for _, g, _ in group],
                [st["exp_avg"] for _, _, st in group], [st["exp_avg_sq"] for _, _, st in group],
                [st["step"] for _, _, st in group], *hyper, maximize)

    def _update(self, p, grad, state, hyper, step: int, maximize: bool) -> None:
        if self.paged:
            paged_mod.prefetch_([state[k] for k in _STATE32 + _STATE8 if k in state], p.device)
        if "exp_avg_q" in state:
            code_m, code_v = self._code(p.device, True), self._code(p.device, False)
            torch.ops.qlora_kernels.adamw8bit_step_(
                p, grad, state["exp_avg_q"], state["exp_avg_absmax"], state["exp_avg_sq_q"],
                state["exp_avg_sq_absmax"], code_m, code_v, *hyper, step, maximize)
            return
        torch.ops.qlora_kernels.adamw_step_(p, grad, state["exp_avg"], state["exp_avg_sq"],
                                            *hyper, step, maximize)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict:
        """torch's state dict; each 8-bit state also carries its two 256-entry code tables
        (``qmap_m`` signed, ``qmap_v`` unsigned, as bitsandbytes keeps ``qmap1``/``qmap2``), so
        a checkpoint says how its uint8 moments decode.

        Example:
            >>> import torch, qlora_kernels as qk
            >>> w = torch.nn.Parameter(torch.randn(5000)); opt = qk.optim.AdamW8bit([w])
            >>> w.grad = torch.randn(5000); opt.step()
            >>> [k for k in opt.state_dict()["state"][0] if k.startswith("qmap")]
            ['qmap_m', 'qmap_v']
        """
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # torch shares the live dicts
        for st in sd["state"].values():
            if "exp_avg_q" in st:
                st["qmap_m"] = self._code(torch.device("cpu"), True)
                st["qmap_v"] = self._code(torch.device("cpu"), False)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict (from this class, or torch.optim.AdamW for 32-bit state) and put
        every state back where a fresh step would: float32 / uint8 on the param's device, in
        managed memory again when paged (never silently in ordinary device memory).

        Example:
            >>> import torch, qlora_kernels as qk
            >>> w = torch.nn.Parameter(torch.randn(5)); opt = qk.optim.AdamW([w])
            >>> w.grad = torch.randn(5); opt.step()
            >>> opt2 = qk.optim.AdamW([w]); opt2.load_state_dict(opt.state_dict())
            >>> torch.equal(opt2.state[w]["exp_avg"], opt.state[w]["exp_avg"])
            True
        """
        groups = state_dict["param_groups"]
        saved_ids = itertools.chain.from_iterable(g["params"] for g in groups)
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        restored = {}
        if [len(g["params"]) for g in groups] == [len(g["params"]) for g in self.param_groups]:
            # every state checked and rebuilt before anything is replaced (a mismatch of the
            # groups is torch's error, below)
            restored = {id_map[key]: self._restore_state(id_map[key], saved)
                        for key, saved in state_dict["state"].items() if key in id_map}
        # torch would cast every floating state to the param's dtype (wrong for float32
        # state of bf16 params, and for uint8 codes): load the groups only, then the state.
        super().load_state_dict({"state": {}, "param_groups": groups})
        for p, state in restored.items():
            self.state[p] = state

    def _restore_state(self, p: torch.Tensor, saved: dict) -> dict:
        is8 = "exp_avg_q" in saved
        if not is8 and "exp_avg" not in saved:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state of a param has "
                             f"neither exp_avg nor exp_avg_q (keys {sorted(saved)})")
        if is8 != self._use_8bit(p):
            have, want = ("8-bit", "32-bit") if is8 else ("32-bit", "8-bit")
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state of a param of "
                             f"{p.numel()} elements is {have}, this optimizer keeps {want} state "
                             f"for it (optim_bits={self.optim_bits}, min_8bit_size="
                             f"{self.min_8bit_size}); load it into a matching optimizer")
        if saved.get("max_exp_avg_sq") is not None:
            raise ValueError("load_state_dict: the state holds max_exp_avg_sq (amsgrad), "
                             "which this optimizer does not support")
        for key, signed in (("qmap_m", True), ("qmap_v", False)):
            ours = self._code(torch.device("cpu"), signed)
            if is8 and key in saved and not torch.equal(torch.as_tensor(saved[key]).float().cpu(),
                                                        ours):
                raise ValueError(f"load_state_dict: the checkpoint's 8-bit code table {key} "
                                 f"differs from this optimizer's dynamic map; its moments would "
                                 f"decode wrongly")
        out = {"step": torch.as_tensor(saved["step"], dtype=torch.float32).detach().cpu().clone()}
        reference.check_step_counter(out["step"], "load_state_dict: 'step'")
        nblocks = -(-p.numel() // BLOCKSIZE)
        expect = ({"exp_avg_q": (p.numel(), torch.uint8), "exp_avg_sq_q": (p.numel(), torch.uint8),
                   "exp_avg_absmax": (nblocks, torch.float32),
                   "exp_avg_sq_absmax": (nblocks, torch.float32)} if is8 else
                  {"exp_avg": (p.numel(), torch.float32), "exp_avg_sq": (p.numel(), torch.float32)})
        for key, (numel, dtype) in expect.items():
            val = saved[key]
            if val.numel() != numel:
                raise ValueError(f"load_state_dict: {key} has {val.numel()} elements, the param "
                                 f"needs {numel} (a state dict of a different model?)")
            _check_state_values(key, val, dtype)
            shape = (nblocks,) if key.endswith("absmax") else p.shape
            dst = self._zeros(shape, dtype, p.device)
            dst.copy_(val.reshape(shape))  # also moves across devices (GPU <-> CPU)
            out[key] = dst
        return out


class PagedAdamW(AdamW):
    """``AdamW(paged=True)``: large states in CUDA unified memory, paged out under pressure.

    Example:
        >>> import torch, qlora_kernels as qk, warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # no CUDA here: ordinary memory, one warning
        ...     opt = qk.optim.PagedAdamW([torch.nn.Parameter(torch.randn(4))], lr=2e-4)
        >>> opt.paged
        True
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs):
        kwargs.setdefault("paged", True)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class AdamW8bit(AdamW):
    """AdamW with both moments blockwise 8-bit (params below ``min_8bit_size`` keep 32-bit).

    Example:
        >>> import torch, qlora_kernels as qk
        >>> w = torch.nn.Parameter(torch.randn(5000)); opt = qk.optim.AdamW8bit([w])
        >>> w.grad = torch.randn(5000); opt.step(); opt.state[w]["exp_avg_q"].dtype
        torch.uint8
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs):
        kwargs.setdefault("optim_bits", 8)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class PagedAdamW8bit(AdamW8bit):
    """``AdamW8bit`` with paged state.

    Example:
        >>> import torch, qlora_kernels as qk, warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     opt = qk.optim.PagedAdamW8bit([torch.nn.Parameter(torch.randn(4))])
        >>> (opt.paged, opt.optim_bits)
        (True, 8)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs):
        kwargs.setdefault("paged", True)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


def _paged_groups(batch, max_bytes: int) -> list:
    """Consecutive groups of ``(param, grad, state)`` whose float32 states (8 bytes per
    element) add up to at most ``max_bytes``; a larger param is a group of its own.

    Example:
        >>> import torch
        >>> batch = [(torch.zeros(n), None, {}) for n in (10, 10, 30, 5)]
        >>> [len(g) for g in _paged_groups(batch, 8 * 20)]
        [2, 1, 1]
    """
    groups, current, size = [], [], 0
    for item in batch:
        nbytes = 8 * item[0].numel()
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def _check_hyper(group: dict) -> None:
    if group.get("amsgrad", False):
        raise ValueError("amsgrad=True is not supported by qlora_kernels' AdamW (it would need "
                         "a third state buffer); use torch.optim.AdamW(amsgrad=True) instead")
    lr = group["lr"]
    if not float(lr) >= 0.0:
        raise ValueError(f"invalid learning rate: {lr!r} (must be >= 0)")
    if not float(group["eps"]) >= 0.0:
        raise ValueError(f"invalid eps: {group['eps']!r} (must be >= 0)")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas!r} (two values in [0, 1))")
    if not float(group["weight_decay"]) >= 0.0:
        raise ValueError(f"invalid weight_decay: {group['weight_decay']!r} (must be >= 0)")


def _check_state_values(key: str, val: torch.Tensor, dtype: torch.dtype) -> None:
    """A loaded state tensor must hold what ``dtype`` can store without wrapping: codes are
    whole numbers in [0, 255], absmax values finite and >= 0 (a copy_ would wrap 300 to 44)."""
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"load_state_dict: {key} is a {type(val).__name__}, not a tensor")
    if dtype == torch.uint8:
        if val.dtype == torch.uint8 or val.numel() == 0:
            return
        whole = val.is_floating_point() and bool((val == val.round()).all())
        whole = whole or (not val.is_floating_point() and not val.is_complex()
                          and val.dtype != torch.bool)
        if not (whole and bool((val >= 0).all() & (val <= 255).all())):
            raise ValueError(f"load_state_dict: {key} ({val.dtype}) holds values that are not "
                             "8-bit codes (whole numbers in [0, 255])")
    elif not val.is_floating_point():
        raise ValueError(f"load_state_dict: {key} must be floating point, got {val.dtype}")
    elif key.endswith("absmax") and val.numel() and not bool(
            (torch.isfinite(val) & (val >= 0)).all()):
        raise ValueError(f"load_state_dict: {key} holds a negative, NaN or Inf scale")
