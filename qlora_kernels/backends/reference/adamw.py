"""Pure-PyTorch reference of the optimizer ops (the test oracle and the fallback kernels).

``adamw_step_`` repeats torch.optim.AdamW's single-tensor update op for op (see
csrc/include/qk_adamw.h for the order), on float32 state; a lower-precision param is
updated in float32 and rounded once per step. ``adamw8bit_step_`` decodes both moments,
applies the same update and re-encodes them blockwise (blocks of 256) with the reference
8-bit quantizer. Signatures follow the op schemas in csrc/ops.cpp.

Example:
    >>> import torch
    >>> from qlora_kernels.backends.reference import adamw as reference
    >>> p, g = torch.ones(4), torch.full((4,), 0.5)
    >>> m, v = torch.zeros(4), torch.zeros(4)
    >>> reference.adamw_step_(p, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, False)
    >>> round(p[0].item(), 4)
    0.9
"""
from __future__ import annotations

import torch

from . import dequantize_8bit, quantize_8bit

OPTIM_BLOCKSIZE = 256


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The double-precision scalars of one AdamW step, as torch computes them.

    Example:
        >>> adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)["step_size"]
        0.010000000000000002
    """
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return {"decay": 1 - lr * weight_decay, "step_size": lr / bias_correction1,
            "bias_correction2_sqrt": bias_correction2 ** 0.5}


def _flat_inplace(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (it is updated in place)")
    return t.view(-1)


_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_state(param, t, dtype, numel: int, op: str, what: str) -> None:
    if t.device != param.device:
        raise ValueError(f"{op}: {what} is on {t.device} but param is on {param.device}")
    if t.dtype != dtype:
        raise ValueError(f"{op}: {what} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{op}: {what} has {t.numel()} elements, expected {numel}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {what} must be contiguous (it is updated in place)")


def check_adamw_common(param, grad, lr, beta1, beta2, eps, step, op: str = "adamw_step_") -> None:
    """The checks of csrc/include/qk_optim_checks.h (check_common) for the reference, so a
    bad argument fails the same way on every backend: param/grad dtype, size and device,
    lr, betas and eps ranges, and ``step`` a whole number >= 1.

    Example:
        >>> import torch
        >>> check_adamw_common(torch.ones(2), torch.ones(2), -1.0, 0.9, 0.999, 1e-8, 1)
        Traceback (most recent call last):
        ValueError: adamw_step_: lr must be >= 0, got -1.0
    """
    if param.dtype not in _PARAM_DTYPES:
        raise ValueError(f"{op}: param must be float32, float16 or bfloat16, got {param.dtype}")
    if not param.is_contiguous():
        raise ValueError(f"{op}: param must be contiguous (it is updated in place)")
    if grad.is_sparse:
        raise ValueError(f"{op}: sparse gradients are not supported")
    if grad.dtype != param.dtype:
        raise ValueError(f"{op}: grad dtype {grad.dtype} differs from param dtype {param.dtype}")
    if grad.numel() != param.numel():
        raise ValueError(f"{op}: grad has {grad.numel()} elements, param {param.numel()}")
    if grad.device != param.device:
        raise ValueError(f"{op}: grad is on {grad.device} but param is on {param.device}")
    if not lr >= 0.0:
        raise ValueError(f"{op}: lr must be >= 0, got {lr}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{op}: {name} must be in [0, 1), got {b}")
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{op}: step must be an int, got {type(step).__name__} {step!r}")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1 (count it before the update), got {step}")


def check_step_counter(st, what: str) -> int:
    """The count held by an optimizer step counter (torch's layout: a one-element float32 CPU
    tensor holding a whole number in [0, 2^24)); ValueError naming ``what`` otherwise.

    Example:
        >>> import torch
        >>> check_step_counter(torch.tensor(3.0), "step")
        3
    """
    if not isinstance(st, torch.Tensor) or st.device.type != "cpu" or \
            st.dtype != torch.float32 or st.numel() != 1:
        raise ValueError(f"{what} must be a one-element float32 CPU tensor (torch's step "
                         f"counter), got {getattr(st, 'dtype', type(st).__name__)} with "
                         f"{getattr(st, 'numel', lambda: '?')()} elements on "
                         f"{getattr(st, 'device', '?')}")
    count = float(st)
    if not (0 <= count < 2 ** 24 and count == int(count)):
        raise ValueError(f"{what} holds {count}, not a step count (a whole number in [0, 2^24))")
    return int(count)


def check_adamw_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step) -> None:
    """All checks of one 32-bit ``adamw_step_`` call (writes nothing)."""
    check_adamw_common(param, grad, lr, beta1, beta2, eps, step)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_state(param, t, torch.float32, param.numel(), "adamw_step_", name)


def check_adamw8bit_args(param, grad, qm, absmax_m, qv, absmax_v, code_m, code_v, lr, beta1,
                         beta2, eps, step) -> None:
    """All checks of one ``adamw8bit_step_`` call (writes nothing)."""
    op = "adamw8bit_step_"
    check_adamw_common(param, grad, lr, beta1, beta2, eps, step, op)
    n = param.numel()
    nblocks = -(-n // OPTIM_BLOCKSIZE)
    for name, t, dtype, numel in (("qm", qm, torch.uint8, n), ("qv", qv, torch.uint8, n),
                                  ("absmax_m", absmax_m, torch.float32, nblocks),
                                  ("absmax_v", absmax_v, torch.float32, nblocks),
                                  ("code_m", code_m, torch.float32, 256),
                                  ("code_v", code_v, torch.float32, 256)):
        _check_state(param, t, dtype, numel, op, name)


def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, step: int, maximize: bool) -> None:
    """One AdamW step in place on param, exp_avg, exp_avg_sq (float32 state)."""
    check_adamw_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step)
    p_flat = _flat_inplace(param, "param")
    p = p_flat if param.dtype == torch.float32 else p_flat.float()
    g = grad.reshape(-1).float()
    if maximize:
        g = -g
    m, v = _flat_inplace(exp_avg, "exp_avg"), _flat_inplace(exp_avg_sq, "exp_avg_sq")
    s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    if weight_decay != 0:
        p.mul_(s["decay"])
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / s["bias_correction2_sqrt"]).add_(eps)
    p.addcdiv_(m, denom, value=-s["step_size"])
    if p is not p_flat:
        p_flat.copy_(p)


def adamw_step_multi_(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      maximize: bool, update=None) -> None:
    """``adamw_step_`` (or ``update``, another backend's) for each param in turn. ``state_steps[i]`` is ``params[i]``'s float32
    step counter (torch's state layout); each is counted by one, then used, as torch does.

    Example:
        >>> import torch
        >>> p, st = torch.zeros(3), torch.tensor(0.0)
        >>> adamw_step_multi_([p], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], [st],
        ...                   0.5, 0.9, 0.999, 1e-8, 0.0, False)
        >>> ([round(x, 4) for x in p.tolist()], float(st))
        ([-0.5, -0.5, -0.5], 1.0)
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        raise ValueError(f"adamw_step_multi_: params, grads, exp_avgs, exp_avg_sqs and "
                         f"state_steps must have the same length, got {n}, {len(grads)}, "
                         f"{len(exp_avgs)}, {len(exp_avg_sqs)}, {len(state_steps)}")
    counts = []
    for i, st in enumerate(state_steps):  # every check before any write, as the kernel
        counts.append(check_step_counter(st, f"adamw_step_multi_: state_steps[{i}]") + 1)
        check_adamw_args(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], lr, beta1, beta2, eps,
                         counts[-1])
    for st, step in zip(state_steps, counts):
        st.fill_(step)
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, counts):
        (update or adamw_step_)(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, maximize)


def adamw8bit_step_(param, grad, qm, absmax_m, qv, absmax_v, code_m, code_v, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                    maximize: bool) -> None:
    """The AdamW step with both moments stored blockwise 8-bit (blocks of 256).

    A NaN/Inf gradient element turns its param NaN (as the 32-bit step does); its moments
    are stored as 0 and left out of the block's absmax, so the other elements of its block
    keep theirs (a NaN absmax would decode the whole block as NaN on the next step).
    """
    check_adamw8bit_args(param, grad, qm, absmax_m, qv, absmax_v, code_m, code_v, lr, beta1,
                         beta2, eps, step)
    bs = OPTIM_BLOCKSIZE
    m = dequantize_8bit(qm, absmax_m, code_m, bs, torch.float32)
    v = dequantize_8bit(qv, absmax_v, code_v, bs, torch.float32)
    adamw_step_(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, maximize)
    bad = ~(torch.isfinite(m) & torch.isfinite(v))
    m.masked_fill_(bad, 0.0)
    v.masked_fill_(bad, 0.0)
    for new, q, absmax, code in ((m, qm, absmax_m, code_m), (v, qv, absmax_v, code_v)):
        nq, nabsmax = quantize_8bit(new, code, bs)
        q.view(-1).copy_(nq)
        absmax.copy_(nabsmax)


# Managed memory needs the CUDA build; without it nothing is managed and prefetch does nothing.
def managed_supported(device: int) -> bool:
    return False


def managed_empty(size, dtype, device: int):
    raise RuntimeError("managed_empty: CUDA unified memory needs qlora_kernels built with CUDA "
                       "(the loaded build has no CUDA kernels)")


def managed_prefetch_(tensors, device: int) -> None:
    return None


def is_managed(t) -> bool:
    return False
