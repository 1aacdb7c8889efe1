"""Optimizers: fused AdamW, paged (CUDA unified memory) and 8-bit variants.

Example:
    >>> import torch, qlora_kernels as qk
    >>> w = torch.nn.Parameter(torch.randn(8))
    >>> opt = qk.optim.AdamW([w], lr=2e-4, weight_decay=0.0)
    >>> w.grad = torch.randn(8); opt.step(); opt.zero_grad()
"""
from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]
