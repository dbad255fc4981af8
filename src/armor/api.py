"""Top-level convenience functions (``armor.load``, ``armor.export_dense``), importing transformers lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load", "export_dense"]


def load(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load a pruned model folder written by ``armor prune`` / :func:`armor.model.save_pruned`."""
    from .model.io import load_pruned

    return load_pruned(path, dtype=dtype, device=device)


def export_dense(path_or_model: str | Path | nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a plain Hugging Face folder of a pruned model (see :func:`armor.model.io.export_dense`)."""
    from .model.io import export_dense as _export

    return _export(path_or_model, out_dir, tokenizer)
