"""The LM head and the cross-entropy loss in chunks of tokens, never the full logits.

A causal LM's loss ``cross_entropy(h·Wᵀ, labels)`` over T tokens and a vocabulary of V
materializes T×V logits, then again in float32 (transformers upcasts them), then their
gradient: for SmolLM2 (V = 49152) at 4×128 tokens that is 100 MB of float32 logits and as
much of gradient. Here the head product, the log-softmax, the loss and the gradient with
respect to h (and W when it trains) are computed a chunk of tokens at a time during the
forward (a chunk's float32 logits: about ``CHUNK_ELEMENTS`` values), so the backward only
scales the stored gradient. Labels follow transformers' ``ForCausalLMLoss``: shifted by
one (the last position predicts nothing), ``ignore_index`` skipped, the mean over the
counted tokens or the sum divided by ``num_items_in_batch`` when given.

``chunked_causal_lm_loss(model)`` (called by ``prepare_model``) makes a transformers causal
LM compute its loss this way whenever it gets ``labels``; it then returns ``logits=None``.

Example:
    >>> import torch
    >>> from qlora_kernels.chunked_loss import linear_cross_entropy
    >>> h, w = torch.randn(10, 16), torch.randn(50, 16)
    >>> labels = torch.randint(0, 50, (10,))
    >>> ref = torch.nn.functional.cross_entropy(h @ w.T, labels)
    >>> bool(torch.allclose(linear_cross_entropy(h, w, labels), ref, rtol=1e-5))
    True
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

# float32 logits per chunk (32 MB): large enough for efficient GEMMs, small enough to stay
# far below the full logits of any real batch.
CHUNK_ELEMENTS = 1 << 23


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, divisor, chunk, grads):
        # the gradients are computed here, with each chunk's logits, when the caller wants them
        want_h = grads and h.requires_grad
        want_w = grads and weight.requires_grad
        ctx.weight_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        for t0 in range(0, h.shape[0], chunk):
            hc, lc = h[t0:t0 + chunk], labels[t0:t0 + chunk]
            logits = (hc @ weight.T).float()  # rounded to h's dtype first, as nn.Linear does
            keep = lc != ignore_index
            target = torch.where(keep, lc, 0)
            lse = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(keep, lse - picked, 0.0).sum()
            if want_h or want_w:
                # d loss / d logits = (softmax - onehot) / divisor, zero for ignored tokens
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, target[:, None], -torch.ones_like(lse)[:, None])
                g.mul_((keep.float() / divisor)[:, None])
                g = g.to(h.dtype)
                if want_h:
                    torch.mm(g, weight, out=grad_h[t0:t0 + chunk])
                if want_w:
                    grad_w.addmm_(g.T.float(), hc.float())
        ctx.save_for_backward(grad_h, grad_w)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, num_items_in_batch=None,
                         chunk: Optional[int] = None) -> torch.Tensor:
    """``cross_entropy(h @ weight.T, labels)`` (float32 loss) over tokens ``h`` (T, H),
    head ``weight`` (V, H) and ``labels`` (T,), computed ``chunk`` tokens at a time (default:
    about ``CHUNK_ELEMENTS`` logits per chunk). Reduction as transformers': the mean over
    tokens whose label is not ``ignore_index``, or the sum / ``num_items_in_batch``.

    Example:
        >>> h, w = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8)
        >>> linear_cross_entropy(h, w, torch.tensor([1, 2, -100, 3, 4, 5]), chunk=4).backward()
        >>> h.grad[2].abs().sum().item()
        0.0
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h must be (T, H) and weight (V, H), got "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    if labels.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: labels must be ({h.shape[0]},), got "
                         f"{tuple(labels.shape)}")
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    labels = labels.to(h.device)
    if num_items_in_batch is None:
        divisor = (labels != ignore_index).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=h.device).float()
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, labels, ignore_index, divisor, int(chunk), grads)


class _Passthrough(nn.Module):
    """Stands in for the LM head during a forward that computes the loss in chunks: the
    model's "logits" are then its final hidden states."""

    def forward(self, h):
        return h


def chunked_causal_lm_loss(model: nn.Module, chunk: Optional[int] = None) -> bool:
    """Make a transformers causal LM compute its loss with ``linear_cross_entropy`` whenever
    it is called with ``labels`` (the returned ``logits`` are then None); calls without
    labels are untouched. Returns False (and changes nothing) for a model whose forward is
    not the plain ``logits = lm_head(h)`` followed by ``ForCausalLMLoss`` (a logit scale or
    soft-capping, a non-causal head, a head that is not an ``nn.Linear``).

    Example:
        >>> chunked_causal_lm_loss(torch.nn.Linear(2, 2))
        False
    """
    head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    if (not type(model).__name__.endswith("ForCausalLM") or type(head) is not nn.Linear
            or head.bias is not None or config is None
            or getattr(config, "final_logit_softcapping", None) is not None
            or getattr(config, "logit_scale", None) not in (None, 1.0)
            or getattr(model, "_qk_chunked_loss", False)):
        return False
    forward = model.forward

    @functools.wraps(forward)
    def chunked_forward(*args, labels=None, **kwargs):
        if labels is None:
            return forward(*args, **kwargs)
        ignore_index = kwargs.pop("ignore_index", -100)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        real_head = model.lm_head
        model.lm_head = _Passthrough()
        try:
            out = forward(*args, **kwargs)
        finally:
            model.lm_head = real_head
        h = out.logits
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        out.loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), real_head.weight,
                                        shift_labels.reshape(-1), ignore_index, num_items, chunk)
        out.logits = None
        return out

    model.forward = chunked_forward
    model._qk_chunked_loss = True
    return True
