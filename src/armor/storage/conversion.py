"""A checkpoint's tensors under the model's own state-dict keys, as transformers' ``from_pretrained`` maps them.

transformers 5 loads some checkpoints through weight conversions (``transformers.conversion_mapping``): keys are
renamed (Mixtral's ``block_sparse_moe.`` is ``mlp.``, GPT-NeoX's ``embed_out.`` is ``lm_head.``) and per-expert
matrices are merged into stacked 3-D parameters (``experts.<e>.w1/w3`` into ``experts.gate_up_proj``).
``save_pretrained`` writes the checkpoint keys back, so every mixture-of-experts folder holds per-expert keys.

A streamed run reads one block at a time and needs each tensor under the model's key.  :func:`checkpoint_view`
replays transformers' key mapping on the checkpoint's names (no tensor data read) and unfuses the skeleton's
stacked experts (:class:`armor.models.LinearExperts`), so each expert's layer ``<experts>.gate_up_proj.<e>`` is
read from its own stored matrices (or its slice of a stored stacked tensor) and nothing larger.  A conversion it
cannot replay a tensor at a time (other than renames and the experts' merge) is an error naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import stacked_experts, unfuse_experts
from .checkpoint import CheckpointError, ShardReader

__all__ = ["CheckpointView", "checkpoint_view"]

_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class _Source:
    """Where one model tensor is stored: stored keys (each whole, or its row ``index`` of a stacked tensor),
    concatenated along dim 0."""

    parts: tuple[tuple[str, int | None], ...]


class CheckpointView:
    """The tensors of a :class:`ShardReader` under the model's state-dict keys (the reader's interface)."""

    def __init__(self, reader: ShardReader, sources: dict[str, _Source], unfused_experts: list[str]) -> None:
        self.raw = reader
        self.folder = reader.folder
        self.sources = sources
        self.unfused_experts = unfused_experts
        self.unused: list[str] = []  # stored keys that no model tensor reads

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def keys(self) -> list[str]:
        return list(self.sources)

    def float_dtype(self) -> torch.dtype | None:
        return self.raw.float_dtype()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every model tensor's shape, from the files' headers."""
        stored = self.raw.shapes()
        out: dict[str, tuple[int, ...]] = {}
        for key, src in self.sources.items():
            shapes = [stored[k] if i is None else stored[k][1:] for k, i in src.parts]
            out[key] = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
        return out

    def load(
        self, keys: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]:
        """The model tensors ``keys``, floating point cast to ``dtype``."""
        keys = list(keys)
        for k in keys:
            if k not in self.sources:
                raise KeyError(f"tensor {k!r} is not in the checkpoint {self.folder}")
        whole = self.raw.load(dict.fromkeys(s for k in keys for s, i in self.sources[k].parts if i is None), dtype)
        out: dict[str, Tensor] = {}
        for k in keys:
            # each stored tensor feeds one model tensor: dropped once joined, so a block is not held twice
            parts = [whole.pop(s) if i is None else self.raw.load_row(s, i, dtype) for s, i in self.sources[k].parts]
            out[k] = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device)
        return out


def _transforms(model: nn.Module) -> tuple[list, list]:
    """transformers' (renamings, converters) for ``model``; none before transformers 5 (checkpoint keys are the
    model's own there)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _target(key: str, renamings: list, converters: list, model: nn.Module, meta: dict) -> tuple[str, str | None]:
    """The model key a stored ``key`` loads into, and the converter source pattern it matched (None: a rename)."""
    if not renamings and not converters:
        return key, None
    from transformers.core_model_loading import rename_source_key

    return rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None), meta)


def _natural(key: str) -> list:
    """transformers' order of the tensors a converter merges (``experts.10`` after ``experts.9``)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key) if p]


def _merge_per_expert(converter: object) -> bool:
    """Whether a converter stacks per-expert matrices (``MergeModulelist(dim=0)``), then optionally joins the
    stacks along their rows (``Concatenate(dim=1)``): expert ``e``'s matrix is its sources' ``e``-th, joined."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(converter, "operations", ())]
    return ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def checkpoint_view(reader: ShardReader, model: nn.Module) -> CheckpointView:
    """``reader``'s tensors under the keys of ``model``, a ``meta`` skeleton of the checkpoint's config; its stacked
    experts modules are unfused first (one ``nn.Linear`` per expert matrix, the layers armor prunes).

    Raises ValueError for a model tensor transformers builds by a conversion other than a rename or the experts'
    merge, and :class:`~armor.storage.checkpoint.CheckpointError` for an experts merge whose stored matrices do
    not number the config's experts.
    """
    renamings, converters = _transforms(model)
    meta = model.state_dict(keep_vars=True)
    sources: dict[str, _Source] = {}
    merged: dict[str, dict[str, list[str]]] = {}  # converter target -> source pattern -> stored keys
    for key in reader.keys():
        target, pattern = _target(key, renamings, converters, model, meta)
        if pattern is None:
            sources.setdefault(target, _Source(((key, None),)))
        else:
            merged.setdefault(target, {}).setdefault(pattern, []).append(key)
    stacked = stacked_experts(model)
    for target, by_pattern in merged.items():
        if target in meta:
            sources.update(_per_expert(reader, target, by_pattern, converters, stacked))
    stored_shapes = reader.shapes() if stacked else {}  # the headers, read once for every experts module
    for name, mod in stacked.items():  # a checkpoint that stores the stacked tensors themselves: one row each
        for param in _EXPERT_PARAMS:
            whole = sources.pop(f"{name}.{param}", None)
            if whole is not None and len(whole.parts) == 1:
                key, target = whole.parts[0][0], f"{name}.{param}"
                sources.update(_rows(reader.folder, key, stored_shapes[key], target, getattr(mod, param).shape[0]))
    unfused = unfuse_experts(model, check=False) if stacked else []
    final = model.state_dict(keep_vars=True)
    view = CheckpointView(reader, {k: v for k, v in sources.items() if k in final}, unfused)
    used = {key for src in view.sources.values() for key, _ in src.parts}
    view.unused = [k for k in reader.keys() if k not in used]
    return view


def _per_expert(
    reader: ShardReader, target: str, by_pattern: dict[str, list[str]], converters: list,
    stacked: dict[str, nn.Module],
) -> dict[str, _Source]:
    """The per-expert sources of one stacked experts parameter ``target`` that a converter merges."""
    converter = next(c for c in converters if set(by_pattern) <= set(c.source_patterns))
    name, _, param = target.rpartition(".")
    stored = sorted(k for keys in by_pattern.values() for k in keys)
    if name not in stacked or param not in _EXPERT_PARAMS or not _merge_per_expert(converter):
        ops = ", ".join(type(op).__name__ for op in getattr(converter, "operations", ()))
        raise ValueError(
            f"{reader.folder}: transformers builds {target} from {len(stored)} stored tensor(s) ({stored[0]}, ...) "
            f"with {ops}, which a streamed run cannot read a block at a time; prune this model in memory "
            "(without --streaming)"
        )
    experts = getattr(stacked[name], param).shape[0]
    lists = [sorted(by_pattern.get(p, []), key=_natural) for p in converter.source_patterns]
    if any(len(keys) != experts for keys in lists):
        counts = ", ".join(f"{len(keys)} {p!r}" for keys, p in zip(lists, converter.source_patterns, strict=True))
        raise CheckpointError(f"{reader.folder}: {target} merges {counts} stored matrices, but the config has "
                              f"{experts} experts")
    return {f"{name}.{param}.{e}.weight": _Source(tuple((keys[e], None) for keys in lists)) for e in range(experts)}


def _rows(folder: Path, key: str, stored: tuple[int, ...], target: str, experts: int) -> dict[str, _Source]:
    """The per-expert sources of a stacked experts tensor ``key`` (of shape ``stored``) stored as it is: expert
    ``e`` reads row ``e``."""
    if not stored or stored[0] != experts:
        raise CheckpointError(f"{folder}: {key} holds {stored[0] if stored else 0} experts' matrices, but the "
                              f"config has {experts} experts")
    return {f"{target}.{e}.weight": _Source(((key, e),)) for e in range(experts)}
