"""Floating-point dtypes by name: ``torch.float16`` from ``"float16"``/``"fp16"``/``"half"`` (command line, configs)."""

from __future__ import annotations

import torch

__all__ = ["resolve_dtype"]


#: the dtypes a model runs in (float64 too: the dense paths compute in it); float8 types and integers cannot
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float16`` from ``"float16"``/``"fp16"``/``"half"`` and the like; ``None`` stays ``None``.  A name or
    ``torch.dtype`` a model cannot run in (an integer or float8 type) is a ValueError naming it."""
    if dtype is None:
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    value = getattr(torch, aliases.get(dtype, dtype), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or value not in _FLOATS:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value
