"""Which linear layers of a causal LM get pruned.

Architecture-agnostic: the decoder blocks are found as a ``nn.ModuleList`` (the usual attribute paths first,
else the largest ``ModuleList`` whose entries contain linear layers), and every ``nn.Linear`` inside them is a
candidate.  Embeddings, final norm and ``lm_head`` live outside the blocks and therefore stay dense.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["find_decoder_layers", "find_prunable_layers", "name_matches", "get_module", "set_module", "model_device"]

# Attribute paths used by common Hugging Face causal LMs, tried before the generic scan.
_KNOWN_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers with a text decoder
)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (where inputs must go); CPU for a model without parameters."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def get_module(root: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name`` ('' is ``root`` itself)."""
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(root, parent_name), child, module)


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted_name, ModuleList)`` of the model's decoder blocks."""
    for path in _KNOWN_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) and _has_linear(mod[0]):
            return path, mod
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(_has_linear(b) for b in mod):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of blocks "
            "containing nn.Linear layers"
        )
    return best


def name_matches(name: str, pattern: str) -> bool:
    """Whether layer ``name`` matches ``pattern``.

    ``re:<regex>`` is a regular expression searched in the full name.  Anything else is a glob matched against
    the full name or any dotted suffix of it, so ``q_proj``, ``mlp.*`` and ``model.layers.0.*`` all work.
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(name_matches(name, p) for p in patterns)


def find_prunable_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    m: int = 4,
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of the decoder blocks to prune, by full dotted name, in forward order.

    Args:
        include: patterns (see :func:`name_matches`); when given, only matching layers are kept.
        exclude: patterns of layers to leave dense.
        m: group size of the n:m pattern; layers whose ``in_features`` is not a multiple are an error when
        they
            were explicitly included, and skipped otherwise.
    """
    prefix, blocks = find_decoder_layers(model)
    for p in [*(include or []), *(exclude or [])]:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ValueError(f"bad layer pattern {p!r}: {exc}") from None
    out: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks):
        for sub, mod in block.named_modules():
            if not isinstance(mod, nn.Linear) or not sub:
                continue
            name = f"{prefix}.{i}.{sub}"
            if include and not _matches_any(name, include):
                continue
            if exclude and _matches_any(name, exclude):
                continue
            if mod.in_features % m:
                if include:
                    raise ValueError(
                        f"layer {name} has in_features={mod.in_features}, not a multiple of {m}; exclude it"
                    )
                continue
            out[name] = mod
    if not out:
        raise ValueError(
            f"no prunable layers selected (include={list(include or [])}, exclude={list(exclude or [])}); "
            f"layer names look like {prefix}.0.<sub>"
        )
    return out
