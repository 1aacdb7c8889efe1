"""Selective gradient checkpointing: keep the 4-bit matmuls' and attention's outputs.

Non-reentrant gradient checkpointing keeps each block's input and re-runs the block's
forward in the backward, so every 4-bit GEMM of a QLoRA step runs three times (forward,
recompute, input gradient). With this policy (torch's selective activation checkpointing)
the recompute takes the outputs of ``qlora_kernels::matmul_4bit`` and of the fused
attention ops from the forward instead of computing them again, and re-runs only the
cheap ops around them (norms, rotary, activations, the LoRA products). The cost is one
(tokens x out_features) tensor in the compute dtype per 4-bit layer and one attention
output per block kept until the backward (``memory.kept_outputs_per_token``; for
SmolLM2-135M 5760 values per token per block; benchmarks/README.md has the measured peak
RSS against full recompute).

``prepare_model(selective_checkpointing=True)`` (and the default ``"auto"`` for a model on
the CPU; on GPUs checkpointing is mostly there to save memory) calls
``enable_selective_checkpointing(model)``: a transformers model then applies the policy
whenever its gradient checkpointing is non-reentrant (``use_reentrant=False``, the
default), whether enabled before or after ``prepare_model``. Elsewhere, pass
``context_fn=selective_checkpoint_context`` to ``torch.utils.checkpoint.checkpoint``.

Example:
    >>> import torch, qlora_kernels as qk
    >>> from torch.utils.checkpoint import checkpoint
    >>> packed, state = qk.quantize_4bit(torch.randn(32, 64))
    >>> x = torch.randn(4, 64, requires_grad=True)
    >>> f = lambda x: qk.matmul_4bit(x, packed, state).relu()
    >>> checkpoint(f, x, use_reentrant=False, context_fn=selective_checkpoint_context).sum().backward()
    >>> x.grad.shape
    torch.Size([4, 64])
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from . import matmul  # noqa: F401  (registers qlora_kernels::matmul_4bit's implementation)


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    ops = [torch.ops.qlora_kernels.matmul_4bit.default]
    ops += [getattr(aten, n).default for n in names if hasattr(aten, n)]
    return frozenset(ops)


SAVED_OPS = _saved_ops()


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context():
    """The ``context_fn`` for ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
    that keeps the outputs of ``SAVED_OPS`` (the 4-bit matmul, fused attention) instead of
    recomputing them.

    Example:
        >>> fwd, recompute = selective_checkpoint_context(); type(fwd).__name__
        '_CachingTorchDispatchMode'
    """
    return create_selective_checkpoint_contexts(_policy)


def with_selective_policy(checkpoint_func):
    """``checkpoint_func`` (a transformers model's ``functools.partial`` of
    ``torch.utils.checkpoint.checkpoint``) with ``context_fn=selective_checkpoint_context``
    when it is non-reentrant and has no ``context_fn`` of its own; otherwise unchanged
    (reentrant checkpointing cannot take a policy, and a caller's own context wins).

    Example:
        >>> f = with_selective_policy(functools.partial(checkpoint, use_reentrant=False))
        >>> f.keywords["context_fn"] is selective_checkpoint_context
        True
        >>> with_selective_policy(functools.partial(checkpoint, use_reentrant=True)).keywords
        {'use_reentrant': True}
    """
    if (isinstance(checkpoint_func, functools.partial) and checkpoint_func.func is checkpoint
            and checkpoint_func.keywords.get("use_reentrant") is False
            and "context_fn" not in checkpoint_func.keywords):
        return functools.partial(checkpoint_func, context_fn=selective_checkpoint_context)
    return checkpoint_func


def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                every_n_layers: int = 1):
    # the model class's own method, with the policy added to the function it hands out
    type(self)._set_gradient_checkpointing(self, enable=enable, every_n_layers=every_n_layers,
                                           gradient_checkpointing_func=with_selective_policy(
                                               gradient_checkpointing_func))


def enable_selective_checkpointing(model: nn.Module) -> bool:
    """Make a transformers model's non-reentrant gradient checkpointing keep the 4-bit
    matmuls' and attention's outputs (module docstring): the blocks already checkpointed
    get the policy now, and ``gradient_checkpointing_enable`` / ``activation_checkpointing
    _enable`` add it later. Returns False (and changes nothing) for a model without
    transformers' ``_set_gradient_checkpointing``.

    Example:
        >>> enable_selective_checkpointing(torch.nn.Linear(2, 2))
        False
    """
    if not callable(getattr(type(model), "_set_gradient_checkpointing", None)):
        return False
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None:
            module._gradient_checkpointing_func = with_selective_policy(func)
    # an instance attribute bound to the model, so copies of the model bind their own
    model._set_gradient_checkpointing = _set_gradient_checkpointing.__get__(model)
    return True
