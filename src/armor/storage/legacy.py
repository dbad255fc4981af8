"""Format ``armor-model-v1``, written by armor 0.1: ``armor.safetensors`` plus an ``"armor"`` section in
``config.json``.  It still loads through :func:`armor.storage.load_pruned` (``armor.load``), which calls
:func:`load_v1`; ``from_pretrained`` cannot read it: load it with ``armor.load`` and write it again with
:func:`armor.storage.save_pruned` to upgrade it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from ..models import get_module
from .checkpoint import meta_skeleton
from .hf_quantizer import install_packed_modules
from .weights import fill_skeleton, read_weights

__all__ = ["LEGACY_MODEL_FORMAT", "LEGACY_WEIGHTS_NAME", "load_v1"]

LEGACY_MODEL_FORMAT = "armor-model-v1"
LEGACY_WEIGHTS_NAME = "armor.safetensors"


def load_v1(path: Path, section: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    weights = path / section.get("weights", LEGACY_WEIGHTS_NAME)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.__dict__.pop("armor", None)
    model = meta_skeleton(path, config=config)
    for name in section.get("layers", {}):
        get_module(model, name)  # raises with the name when the architecture does not have it
    install_packed_modules(model, section.get("layers", {}), section.get("layer_dtypes", {}), "meta")
    state, aliases = read_weights(weights, LEGACY_MODEL_FORMAT, "format")
    fill_skeleton(model, state, aliases, weights, dtype)
    return model
