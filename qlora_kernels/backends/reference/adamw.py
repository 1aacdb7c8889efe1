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


def _check_adamw_args(param, grad, exp_avg, exp_avg_sq, step: int) -> None:
    if step < 1:
        raise ValueError(f"adamw_step_: step must be >= 1 (count it before the update), got {step}")
    if grad.dtype != param.dtype or grad.numel() != param.numel():
        raise ValueError(f"adamw_step_: grad dtype {grad.dtype} / {grad.numel()} elements differs "
                         f"from param dtype {param.dtype} / {param.numel()} elements")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.numel() != param.numel():
            raise ValueError(f"adamw_step_: {name} has {t.numel()} elements, dtype {t.dtype}; "
                             f"expected float32 with {param.numel()} elements")
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")


def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, step: int, maximize: bool) -> None:
    """One AdamW step in place on param, exp_avg, exp_avg_sq (float32 state)."""
    _check_adamw_args(param, grad, exp_avg, exp_avg_sq, step)
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
        if st.device.type != "cpu" or st.dtype != torch.float32 or st.numel() != 1:
            raise ValueError(f"adamw_step_multi_: state_steps[{i}] must be a one-element "
                             f"float32 CPU tensor (torch's step counter), got {st.dtype} with "
                             f"{st.numel()} elements on {st.device}")
        count = float(st)
        if not (0 <= count < 2 ** 24 and count == int(count)):
            raise ValueError(f"adamw_step_multi_: state_steps[{i}] holds {count}, not a step "
                             f"count (a whole number in [0, 2^24))")
        counts.append(int(count) + 1)
        _check_adamw_args(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], counts[-1])
    for st, step in zip(state_steps, counts):
        st.fill_(step)
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, counts):
        (update or adamw_step_)(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, maximize)


def adamw8bit_step_(param, grad, qm, absmax_m, qv, absmax_v, code_m, code_v, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                    maximize: bool) -> None:
    """The AdamW step with both moments stored blockwise 8-bit (blocks of 256)."""
    bs = OPTIM_BLOCKSIZE
    m = dequantize_8bit(qm, absmax_m, code_m, bs, torch.float32)
    v = dequantize_8bit(qv, absmax_v, code_v, bs, torch.float32)
    adamw_step_(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, maximize)
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
