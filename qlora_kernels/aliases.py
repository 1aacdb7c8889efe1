"""Argument aliases: bitsandbytes' names for our arguments (``compress_statistics`` for
``double_quant``), and deprecated names (``out_dtype`` for ``dtype``), resolved in one place.

Example:
    >>> from qlora_kernels.aliases import pick
    >>> pick("double_quant", None, "compress_statistics", False, default=True)
    False
"""
from __future__ import annotations

import warnings

_UNSET = None


def pick(name: str, value, alias: str, alias_value, default, deprecated: bool = False):
    """``value`` or, when only the alias was given, ``alias_value``; ``default`` when neither
    was. Giving both with different values is a TypeError; a deprecated alias warns.

    Example:
        >>> pick("dtype", None, "out_dtype", None, default="x")
        'x'
    """
    if alias_value is _UNSET:
        return default if value is _UNSET else value
    if deprecated:
        warnings.warn(f"{alias}= is deprecated, use {name}=", DeprecationWarning, stacklevel=3)
    if value is not _UNSET and value != alias_value:
        raise TypeError(f"{name}={value!r} and its alias {alias}={alias_value!r} disagree")
    return alias_value
