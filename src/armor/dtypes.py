"""Floating-point dtypes by name: ``torch.float16`` from ``"float16"``/``"fp16"``/``"half"`` (command line, configs)."""

from __future__ import annotations

import torch

__all__ = ["resolve_dtype"]


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float16`` from ``"float16"``/``"fp16"``/``"half"`` and the like; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(dtype, dtype)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value
