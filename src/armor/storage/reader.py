"""Reading pruned model folders: their armor section, and the model itself (nothing is ever unpickled).

:func:`read_armor_config` returns the flat view the CLI reports from: ``run``'s keys plus ``format``,
``weights``, ``layers``, ``layer_dtypes``, ``versions`` and ``unfused_experts``.  :func:`load_pruned`
(``armor.load``) builds the model on the ``meta`` device, puts empty packed modules in place of the pruned layers
and fills them from the weights file; the folder format is described in :mod:`armor.storage.writer`, the format
armor 0.1 wrote is read by :mod:`armor.storage.legacy`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from ..dtypes import resolve_dtype
from .checkpoint import meta_skeleton
from .hf_quantizer import (
    MODEL_FORMAT,
    QUANT_METHOD,
    ArmorConfig,
    check_packed_tensors,
    check_same_save,
    install_packed_modules,
)
from .legacy import LEGACY_MODEL_FORMAT, LEGACY_WEIGHTS_NAME, load_v1
from .weights import fill_skeleton, read_all_weights, read_weights, weight_files
from .writer import WEIGHTS_NAME, carry_armor_config

__all__ = [
    "read_armor_config", "is_pruned_folder", "load_pruned", "read_weights", "fill_skeleton", "read_config_json",
    "armor_quant_section",
]

def read_config_json(path: Path) -> dict[str, Any] | None:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    return cfg


def armor_quant_section(cfg: Mapping[str, Any], folder: Path) -> dict[str, Any] | None:
    quant = cfg.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise ValueError(
            f"{folder / 'config.json'}: quantization_config is a {type(quant).__name__} ({quant!r:.60}), not an "
            "object; the folder's config is damaged"
        )
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return quant
    return None


def read_armor_config(path: str | Path) -> dict[str, Any] | None:
    """What ``<path>/config.json`` says about the pruning, or ``None`` for a folder that is not armor-pruned.

    The dict holds the run's provenance (``method``, ``options``, ``pattern``, ``calibration``, ``records`` and
    any other ``run_info`` key the run stored) plus ``format``, ``weights`` (file name), ``layers`` (name ->
    module spec), ``layer_dtypes``, ``versions`` and ``unfused_experts`` (mixture-of-experts modules stored as
    per-expert layers; see :func:`armor.storage.hf_quantizer.install_packed_modules`); the same keys for both
    folder formats, and for format v2 ``weights_sha256`` (the weights file's digest, ``None`` for a folder
    ``save_pretrained`` wrote).
    """
    cfg = read_config_json(Path(path))
    if cfg is None:
        return None
    quant = armor_quant_section(cfg, Path(path))
    if quant is not None:
        run = quant.get("run") or {}
        return {
            **run,
            "format": quant.get("format"),
            "weights": WEIGHTS_NAME,
            "layers": quant.get("layers", {}),
            "layer_dtypes": quant.get("layer_dtypes", {}),
            "versions": quant.get("versions", {}),
            "unfused_experts": quant.get("unfused_experts", []),
            "weights_sha256": quant.get("weights_sha256"),
        }
    legacy = cfg.get("armor")
    if isinstance(legacy, dict):
        return {"weights": LEGACY_WEIGHTS_NAME, "unfused_experts": [], **legacy}
    return None


def is_pruned_folder(path: str | Path) -> bool:
    """Whether ``path`` is an armor-pruned model folder (either format)."""
    return read_armor_config(path) is not None


def _load_v2(path: Path, quant: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    try:
        armor_cfg = ArmorConfig.from_dict(quant)  # validates the format and the layer specs
    except ValueError as exc:
        raise ValueError(f"{path / 'config.json'}: {exc}") from None
    files = weight_files(path, WEIGHTS_NAME)
    weights = files[0] if len(files) == 1 else path  # what errors name
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.__dict__.pop("quantization_config", None)  # from_config must build the plain architecture
    check_same_save(files, armor_cfg.weights_sha256, path / "config.json")
    model = meta_skeleton(path, config=config)
    install_packed_modules(model, armor_cfg.layers, armor_cfg.layer_dtypes, "meta", armor_cfg.unfused_experts)
    state, aliases = read_all_weights(files, MODEL_FORMAT, "armor_format")
    check_packed_tensors(model, armor_cfg.layers, {k: tuple(v.shape) for k, v in state.items()})
    fill_skeleton(model, state, aliases, weights, dtype)
    # kept on the config, as from_pretrained keeps it: save_pretrained of this model writes a loadable folder
    return carry_armor_config(model, armor_cfg)


def load_pruned(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load a pruned model folder (format v2, or v1 written by armor 0.1): a working model whose outputs equal
    the saved model's, pruned layers as packed :class:`armor.runtime.ArmorLinear` / ``SparseLinear`` modules.

    Args:
        dtype: cast floating-point weights to this dtype (default: as saved).
        device: where to put the model (default: CPU).
    """
    path = Path(path)
    cfg = read_config_json(path)
    if cfg is None:
        raise FileNotFoundError(f"not a model folder (no config.json): {path}")
    dtype = resolve_dtype(dtype)
    quant = armor_quant_section(cfg, Path(path))
    if quant is not None:
        model = _load_v2(path, quant, dtype)
    elif isinstance(cfg.get("armor"), dict):
        section = cfg["armor"]
        if section.get("format") != LEGACY_MODEL_FORMAT:
            raise ValueError(
                f"{path} is an armor folder of unknown format {section.get('format')!r}; upgrade armor to load it"
            )
        model = load_v1(path, section, dtype)
    else:
        raise ValueError(
            f"{path} is not an armor-pruned model (config.json has no quantization_config with "
            f"quant_method 'armor'); load a plain model with armor.storage.load_model or from_pretrained"
        )
    if device is not None:
        model = model.to(device)
    model.eval()
    model.armor_config = read_armor_config(path)  # the flat view (provenance + layers) the CLI reports from
    return model
