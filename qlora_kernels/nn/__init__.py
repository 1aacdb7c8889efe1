"""Modules: ``Linear4bit`` (frozen 4-bit weight, gradients to the input only)."""
from .linear4bit import Linear4bit

__all__ = ["Linear4bit"]
