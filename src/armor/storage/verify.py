"""Checking a pruned folder against what it says, from the file headers (and, on request, every tensor's data).

:func:`verify_pruned_folder` is what ``armor inspect`` runs before it describes a folder: a folder whose config
lost its layer list, whose weights lack a tensor or store one in another shape, or whose records name layers it
does not have is an error naming the problem, never a summary of something that would not load.  With
``data=True`` (``armor inspect --check-data``) it also reads every stored tensor once, a bounded slice at a time:
packed positions must be what packing writes (as both loaders check), floating-point values finite, and each
weights file's bytes must still have the SHA-256 its writer recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import get_module
from .atomic import safetensors_digest
from .checkpoint import CheckpointError, check_head_alias, meta_skeleton, open_safetensors, tied_head_keys
from .guard import guard_keys
from .hf_quantizer import (
    MODEL_FORMAT,
    WEIGHTS_DIGEST_KEY,
    ArmorConfig,
    check_folder_format,
    check_layer_positions,
    check_packed_tensors,
    check_same_save,
    install_packed_modules,
)
from .reader import read_armor_config
from .weights import shape_problems, weight_files
from .writer import WEIGHTS_NAME

__all__ = ["verify_pruned_folder", "weights_not_as_saved"]


def _stored(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes of the tensors in the weights ``files`` and their ``{alias: kept key}`` map, from the headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, str] = {}
    for weights in files:
        with open_safetensors(weights) as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
            meta = f.metadata() or {}
        try:
            aliases.update(json.loads(meta.get("armor_aliases", meta.get("aliases", "{}"))))
        except ValueError:
            raise CheckpointError(f"{weights} has a corrupt metadata header") from None
    return shapes, aliases


def _check_other_tensors(weights: Path, state: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                         guards: list[str]) -> None:
    """A CheckpointError naming the tensors the loaders refuse: one stored in another shape than the config gives
    it, or one the model does not have (other than the guards)."""
    wrong = shape_problems(state, {k: v for k, v in shapes.items() if k not in guards})
    extra = sorted(set(shapes) - set(state) - set(guards))
    if wrong:
        raise CheckpointError(f"{weights} does not match its config.json: {'; '.join(wrong[:5])}")
    if extra:
        raise CheckpointError(f"{weights} holds tensors the model does not have: {', '.join(extra[:5])} "
                              "(the weights and config.json disagree)")


#: elements of a floating-point tensor checked for finiteness at a time (bounds the check's memory)
_CHUNK = 1 << 24


def _non_finite(f: Any, key: str) -> tuple[int, int]:
    """``(NaN or infinite values, bytes read)`` of the stored floating-point tensor ``key``, read a slice of leading
    rows at a time; ``(0, 0)`` for any other tensor (integer buffers, guards), which is not read."""
    part = f.get_slice(key)
    shape = part.get_shape()
    if not part.get_dtype().startswith(("F", "BF")) or not shape:  # F16/F32/F64/F8_*, BF16
        return 0, 0
    rows = max(1, _CHUNK // max(1, int(torch.Size(shape[1:]).numel())))
    bad = read = 0
    for start in range(0, shape[0], rows):
        t = part[start:start + rows]
        bad += int((~torch.isfinite(t)).sum())
        read += t.numel() * t.element_size()
    return bad, read


def _check_digests(files: list[Path]) -> int:
    """Each weights file that records its SHA-256 (armor's writer does) still has it: a CheckpointError naming the
    file whose bytes changed since it was written (a bit flipped on disk, a partial copy).  Returns how many files
    recorded one."""
    checked = 0
    for weights in files:
        with open_safetensors(weights) as f:
            recorded = (f.metadata() or {}).get(WEIGHTS_DIGEST_KEY)
        if recorded is None:
            continue
        now = safetensors_digest(weights)
        if now != recorded:
            raise CheckpointError(f"{weights}: its tensors' bytes changed since it was written (SHA-256 {now}, "
                                  f"recorded {recorded}); the file is damaged")
        checked += 1
    return checked


def weights_not_as_saved(path: str | Path) -> str | None:
    """Why the weights of the pruned folder at ``path`` cannot be vouched for as armor saved them (``None``: their
    bytes still have the SHA-256 its config records).  A folder recording none (a ``save_pretrained`` re-save, an
    older armor) cannot be vouched for.  Reads the whole weights file once."""
    path = Path(path)
    section = read_armor_config(path) or {}
    recorded = section.get("weights_sha256")
    if not recorded:
        return f"{path / 'config.json'} records no weights SHA-256"
    try:
        files = weight_files(path, section.get("weights", WEIGHTS_NAME))
        check_same_save(files, recorded, path / "config.json")
        now = [safetensors_digest(f) for f in files]
    except (OSError, ValueError) as exc:
        return str(exc)
    if now != [recorded]:
        return f"its weights' SHA-256 is {', '.join(now)}, {path / 'config.json'} records {recorded}"
    return None


def _check_data(files: list[Path], model: nn.Module, layers: dict[str, Any]) -> int:
    """Read every packed layer's positions and every floating-point tensor of the weights ``files``: positions
    must be valid and values finite, else a CheckpointError naming the file and tensor.  Returns the bytes read."""
    index_of = {f"{name}.indices": name for name in layers}
    read = 0
    for weights in files:
        with open_safetensors(weights) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = index_of.get(key)
                if name is None:
                    bad, nbytes = _non_finite(f, key)
                    if bad:
                        raise CheckpointError(f"{weights}: {key} holds {bad} NaN or infinite values")
                    read += nbytes
                    continue
                indices = f.get_tensor(key)
                read += indices.numel()
                check_layer_positions(indices, get_module(model, name), name, weights)
    return read


def verify_pruned_folder(path: str | Path, data: bool = False) -> dict[str, Any]:
    """The folder's flat armor section (:func:`armor.storage.read_armor_config`) once its config, weights and
    records agree; a ValueError (CheckpointError for the weights) naming what does not.  ``data``: also read every
    tensor (positions valid, values finite: :func:`_check_data`) and each file's recorded SHA-256
    (:func:`_check_digests`); the section then has ``checked_bytes`` and ``checked_digests``."""
    path = Path(path)
    section = read_armor_config(path)
    if section is None:
        raise ValueError(f"{path} is not an armor-pruned model (config.json has no armor quantization_config)")
    layers = section.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path / 'config.json'}: quantization_config lists no pruned layers ('layers' is "
                         "missing or empty); the config is damaged")
    if section.get("weights") == WEIGHTS_NAME:  # the section is quantization_config's (format v2)
        try:
            check_folder_format(section.get("format"))
        except ValueError as exc:
            raise ValueError(f"{path / 'config.json'}: {exc}") from None
    ArmorConfig(layers=layers, layer_dtypes=section.get("layer_dtypes"))  # every spec and dtype is valid
    model = meta_skeleton(path, strip_quantization=True)
    install_packed_modules(model, layers, section.get("layer_dtypes", {}), "meta", section.get("unfused_experts", ()))
    files = weight_files(path, section.get("weights", WEIGHTS_NAME))
    weights = files[0] if len(files) == 1 else path  # what errors name
    shapes, aliases = _stored(files)
    check_packed_tensors(model, layers, shapes)
    check_head_alias(model, aliases, weights)
    tied = tied_head_keys(model)
    if tied is not None:  # a tied head that save_pretrained stores once, at the embeddings (the loaders tie it)
        aliases = {tied[1]: tied[0], **aliases}
    state = model.state_dict(keep_vars=True)
    missing = [k for k, t in state.items() if t.is_meta and k not in shapes and aliases.get(k) not in shapes]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{weights} does not provide: {', '.join(missing[:5])}{more}")
    if section.get("format") == MODEL_FORMAT:
        check_same_save(files, section.get("weights_sha256"), path / "config.json")
    _check_other_tensors(weights, state, shapes, guard_keys(layers, section.get("unfused_experts", ())))
    stray = [r.get("name") for r in section.get("records", []) if r.get("name") not in layers]
    if stray:
        raise ValueError(f"{path}: records name layers the folder does not have: {', '.join(map(str, stray[:5]))}")
    if data:
        read = _check_data(files, model, layers)  # first: a damage it finds gets its own message
        section = {**section, "checked_bytes": read, "checked_digests": _check_digests(files)}
    return section
