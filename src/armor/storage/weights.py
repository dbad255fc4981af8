"""Reading a pruned folder's weights file into a model skeleton: shared by the current reader
(:mod:`armor.storage.reader`) and the armor 0.1 one (:mod:`armor.storage.legacy`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, check_head_alias, open_safetensors, untie_distinct_head, weight_files
from .guard import GUARD_SUFFIX, keep_guards
from .hf_quantizer import check_packed_positions
from .writer import pruned_modules

__all__ = ["weight_files", "read_weights", "read_all_weights", "fill_skeleton", "shape_problems"]


def read_all_weights(
    files: list[Path], expected_format: str, format_key: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """:func:`read_weights` of every file of :func:`weight_files`, merged."""
    state: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for f in files:
        part, part_aliases = read_weights(f, expected_format, format_key)
        state.update(part)
        aliases.update(part_aliases)
    return state, aliases


def read_weights(weights: Path, expected_format: str, format_key: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of ``weights`` and its ``{alias: kept key}`` map; clear errors for a damaged file."""
    with open_safetensors(weights) as f:
        meta = f.metadata() or {}
        if format_key in meta and meta[format_key] != expected_format:
            raise ValueError(f"{weights} is format {meta[format_key]!r}, expected {expected_format!r}")
        try:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
        except Exception as exc:  # safetensors raises several types for a file cut after its header
            raise CheckpointError(f"{weights}: cannot read its tensors ({exc}); the file is damaged") from None
    try:
        aliases = json.loads(meta.get("armor_aliases", meta.get("aliases", "{}")))
    except ValueError:
        raise CheckpointError(f"{weights} has a corrupt metadata header") from None
    return state, aliases


def shape_problems(state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Each tensor of the model's ``state`` stored with another shape in ``shapes``, described; a layer's guard
    (an empty tensor at its ``weight``) where the model has a plain weight means the config does not list that
    packed layer."""
    wrong = []
    for k, stored in shapes.items():
        t = state.get(k)
        if t is None or tuple(t.shape) == tuple(stored):
            continue
        if tuple(stored) == (0,) and k.endswith(f".{GUARD_SUFFIX}"):
            wrong.append(f"{k.removesuffix('.' + GUARD_SUFFIX)} is stored packed (its weight is a guard), but "
                         "quantization_config.layers does not list it")
        else:
            wrong.append(f"{k} is {tuple(stored)} in the weights, {tuple(t.shape)} in the model")
    return wrong


def fill_skeleton(
    model: nn.Module, state: dict[str, Tensor], aliases: Mapping[str, str], weights: Path, dtype: torch.dtype | None
) -> None:
    """Load ``state`` into the skeleton ``model`` (floating-point tensors cast to ``dtype`` when given; computed
    buffers such as rotary frequencies keep theirs, as from_pretrained does); tied parameters the file stores once
    are tied again.  The model skips the folder's guard tensors and writes them again when saved (:mod:`.guard`)."""
    keep_guards(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.config.dtype = dtype
    check_head_alias(model, aliases, weights)
    for dup, src in aliases.items():
        if src in state and dup not in state:
            state[dup] = state[src]
    own = model.state_dict(keep_vars=True)
    wrong = shape_problems(own, {k: tuple(v.shape) for k, v in state.items() if k in own})
    if wrong:
        raise CheckpointError(f"{weights} does not match its config.json: {'; '.join(wrong[:5])}")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{weights} holds tensors the model does not have: {', '.join(result.unexpected_keys[:5])} "
            "(the weights and config.json disagree)"
        )
    untie_distinct_head(model, state, weights)  # a head stored apart from the embeddings stays apart
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise CheckpointError(f"{weights} does not provide: {', '.join(left[:5])}")
    packed = pruned_modules(model)
    for mod in packed.values():
        mod.requires_grad_(False)  # frozen, as built: a frozen packed module caches its unpacked form
    check_packed_positions(model, packed, weights)
