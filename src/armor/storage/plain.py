"""Loading a model folder whichever kind it is (a pruned folder, or a plain Hugging Face one), and its tokenizer,
with errors that name the folder instead of transformers' tracebacks."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..dtypes import resolve_dtype
from .checkpoint import CheckpointError, ShardReader, check_shapes, meta_skeleton, raise_uncovered
from .reader import armor_quant_section, is_pruned_folder, load_pruned, read_config_json

__all__ = ["load_model", "load_tokenizer", "stored_dtype"]


def _safetensors_reader(path: str | Path) -> ShardReader | None:
    """The folder's safetensors weights as transformers picks them; None when it has none (pickled weights)."""
    try:
        return ShardReader(path)
    except FileNotFoundError:
        return None


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype a run on the model folder ``path`` computes and saves in when none is asked for: the
    floating-point dtype that stores most of its safetensors values (float32 for pickled weights)."""
    reader = _safetensors_reader(path)
    return (reader.float_dtype() if reader is not None else None) or torch.float32


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """A CheckpointError naming what ``from_pretrained`` reported (and, by default, only logged): model tensors the
    weights lack, which it leaves randomly initialised, and stored tensors the model has no place for (a config
    that describes fewer layers, or another model, than the weights).  Both are lists after transformers' own
    exceptions (tied weights, legacy buffers such as rotary ``inv_freq``)."""
    raise_uncovered(f"the weights in {path}", info.get("missing_keys") or (), info.get("unexpected_keys") or ())


def load_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """A pruned folder via :func:`load_pruned`, or a plain HF causal-LM folder via ``from_pretrained``; floating
    point in ``dtype``, by default as stored (a pickled checkpoint: float32)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder not found (no config.json): {path}")
    if is_pruned_folder(path):
        return load_pruned(path, dtype=dtype, device=device)
    stored = None
    reader = _safetensors_reader(path)
    if reader is not None:
        # a clear error for a truncated file, or a config that does not match the weights, before transformers
        check_shapes(meta_skeleton(path), reader)
        stored = reader.float_dtype() if dtype is None else None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype) or stored or torch.float32, local_files_only=True,
            output_loading_info=True,
        )
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused it: nothing in the file ran
        raise CheckpointError(
            f"{path}: its pickled weights hold objects other than tensors, which armor refuses to unpickle "
            f"(nothing in the file was run); convert it to safetensors from a source you trust ({exc})"
        ) from None
    check_loading_info(path, info)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder; an error naming the folder when it has none that loads."""
    cfg = read_config_json(Path(path))
    if cfg is not None:
        armor_quant_section(cfg, Path(path))  # a damaged quantization_config: said here, not deep inside transformers
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from None
