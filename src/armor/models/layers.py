"""Which linear layers of a causal LM get pruned.

Architecture-agnostic: the decoder blocks are found as a ``nn.ModuleList`` (the usual attribute paths first,
else the largest ``ModuleList`` whose entries contain linear layers), and every ``nn.Linear`` inside them is a
candidate (see :func:`find_prunable_layers` for what is left dense and how that is reported).  Embeddings,
final norm and ``lm_head`` live outside the blocks and therefore stay dense.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .experts import LinearExperts, stacked_experts

__all__ = [
    "find_decoder_layers", "find_prunable_layers", "name_matches", "get_module", "set_module", "model_device",
    "check_token_ids", "position_limit",
]

logger = logging.getLogger(__name__)

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


def position_limit(config: Any) -> int | None:
    """The longest sequence the model was trained for: ``max_position_embeddings`` of its config (an object, or a
    ``config.json`` read as a dict); None when the config states none."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    limit = get("max_position_embeddings")
    return limit if isinstance(limit, int) else None


def check_token_ids(ids: torch.Tensor, model: nn.Module, name: str) -> None:
    """A ValueError naming ``name`` when a token id is outside the model's input embeddings (a tokenizer with more
    tokens than the model's vocabulary): the model would fail deep inside its embedding lookup."""
    try:
        rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # not a Hugging Face model: nothing to check against
        return
    if not isinstance(rows, int) or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} holds token id {bad}, outside the model's vocabulary of {rows} embeddings (ids 0..{rows - 1}); "
            "the tokenizer does not belong to this model"
        )


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


def _block_pattern(name: str, prefix: str) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> ``model.layers.*.mlp.experts.down_proj``."""
    rest = name[len(prefix) + 1 :]
    return f"{prefix}.*.{rest.split('.', 1)[1]}" if "." in rest else name


def _describe_grouped(items: Sequence[tuple[str, tuple[int, ...]]], prefix: str) -> str:
    """``name (shape)`` per distinct layer across blocks: ``model.layers.*.mlp.x (64x3) in 2 blocks``."""
    groups: dict[tuple[str, tuple[int, ...]], int] = {}
    for name, shape in items:
        key = (_block_pattern(name, prefix), shape)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(
        f"{pattern} ({'x'.join(map(str, shape))})" + (f" in {count} blocks" if count > 1 else "")
        for (pattern, shape), count in groups.items()
    )


def _stacked_expert_params(prefix: str, blocks: nn.ModuleList) -> list[tuple[str, tuple[int, ...]]]:
    """Parameters of 3 or more dimensions inside the blocks (mixture-of-experts weights stacked per expert)."""
    found = []
    for i, block in enumerate(blocks):
        for sub, param in block.named_parameters():
            if param.dim() >= 3:
                found.append((f"{prefix}.{i}.{sub}", tuple(param.shape)))
    return found


# nn.Linear subclasses of transformers whose own forward computes what nn.Linear's does (``x W^T + b``)
_PLAIN_LINEAR_SUBCLASSES = frozenset({"FalconLinear"})


def _is_plain_linear(mod: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear``'s: a packed layer computes the same thing in its place.  A
    subclass with its own forward (a mixture-of-experts router returning routing weights, a grouped
    projection) would be replaced by a module that computes something else."""
    cls = type(mod)
    return isinstance(mod, nn.Linear) and (cls.forward is nn.Linear.forward or cls.__name__ in _PLAIN_LINEAR_SUBCLASSES)


def _expert_count(name: str, mod: nn.Module) -> int | None:
    """How many experts a mixture-of-experts container holds (unfused, stacked or a ``ModuleList``); None for any
    other module."""
    if isinstance(mod, LinearExperts):
        return mod.num_experts
    if not name.rpartition(".")[2].endswith("experts"):
        return None
    if isinstance(mod, nn.ModuleList):
        return len(mod)
    stacked = [p for p in mod.parameters(recurse=False) if p.dim() == 3]
    return stacked[0].shape[0] if stacked else None


def _routers(block: nn.Module) -> set[str]:
    """Sub-names of the linear layers of ``block`` that route tokens to experts: outside an experts container,
    under its parent module, one output per expert."""
    containers = {sub: n for sub, mod in block.named_modules() if sub and (n := _expert_count(sub, mod))}
    routers = set()
    for sub, mod in block.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        for experts, n in containers.items():
            parent = experts.rpartition(".")[0]
            under = not parent or sub.startswith(parent + ".")
            if under and not sub.startswith(experts + ".") and mod.out_features == n:
                routers.add(sub)
    return routers


def _selected_linears(
    prefix: str, blocks: nn.ModuleList, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> dict[str, nn.Linear]:
    """The plain ``nn.Linear`` layers of the blocks the patterns select; a selected subclass with a forward of its
    own is left out with a warning naming it, a router with an INFO message."""
    selected: dict[str, nn.Linear] = {}
    own_forward: list[tuple[str, tuple[int, ...]]] = []
    own_classes: set[str] = set()
    routers: list[tuple[str, tuple[int, ...]]] = []
    for i, block in enumerate(blocks):
        routing = _routers(block)
        for sub, mod in block.named_modules():
            if not isinstance(mod, nn.Linear) or not sub:
                continue
            name = f"{prefix}.{i}.{sub}"
            if include and not _matches_any(name, include):
                continue
            if exclude and _matches_any(name, exclude):
                continue
            if not _is_plain_linear(mod):
                own_forward.append((name, (mod.out_features, mod.in_features)))
                own_classes.add(type(mod).__name__)
            elif sub in routing:
                routers.append((name, (mod.out_features, mod.in_features)))
            else:
                selected[name] = mod
    if routers:
        logger.info("leaving %d mixture-of-experts router(s) dense (one output per expert; their models may read "
                    "their weight directly): %s", len(routers), _describe_grouped(routers, prefix))
    if own_forward:
        logger.warning(
            "leaving %d linear layer(s) dense: their class (%s) has a forward of its own, not nn.Linear's, which a "
            "pruned layer would not compute: %s",
            len(own_forward), ", ".join(sorted(own_classes)), _describe_grouped(own_forward, prefix),
        )
    return selected


def find_prunable_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    m: int = 4,
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of the decoder blocks to prune, by full dotted name, in forward order.

    Fused projections (Phi-3 ``qkv_proj`` / ``gate_up_proj``, GPT-NeoX ``query_key_value``) are ordinary
    ``nn.Linear`` layers and are pruned as one layer each.  What cannot be pruned is left dense and logged as a
    warning (logger ``armor.models.layers``) that names it and its shape:

    * a layer whose ``in_features`` is not a multiple of ``m`` (the n:m groups run along the input dimension);
    * mixture-of-experts weights that transformers stores as stacked 3-D parameters (Mixtral, Qwen3-MoE, ...):
      they are not ``nn.Linear`` layers, so no statistics are gathered for them;
    * an ``nn.Linear`` subclass with a forward of its own (PhiMoE's and Llama 4's routers return routing weights
      and scores): the packed layer that would replace it computes a plain ``x W^T + b``.

    Mixture-of-experts routers that are plain ``nn.Linear`` layers (one output per expert, beside an experts
    module: HunYuan-MoE's ``gate.wg``) stay dense too, logged at INFO: they are tiny, pruning them changes which
    experts run, and some models read their ``weight`` directly.

    Args:
        include: patterns (see :func:`name_matches`); when given, only matching layers are kept.
        exclude: patterns of layers to leave dense.
        m: group size of the n:m pattern.

    Raises:
        ValueError: when nothing at all can be pruned, saying why.
    """
    prefix, blocks = find_decoder_layers(model)
    for p in [*(include or []), *(exclude or [])]:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ValueError(f"bad layer pattern {p!r}: {exc}") from None
    selected = _selected_linears(prefix, blocks, include, exclude)
    out = {name: mod for name, mod in selected.items() if mod.in_features % m == 0}
    odd = [(name, (mod.out_features, mod.in_features)) for name, mod in selected.items() if name not in out]
    experts = _stacked_expert_params(prefix, blocks)
    if experts:
        hint = (
            "; armor.models.unfuse_experts(model) turns them into one nn.Linear per expert matrix, pruned with "
            "the statistics of the tokens routed to each expert"
            if any(stacked_experts(block) for block in blocks) else ""
        )
        logger.warning(
            "not pruning %d mixture-of-experts weight tensor(s), left dense: %s; transformers stores these experts "
            "as stacked 3-D parameters, not nn.Linear layers, and armor prunes nn.Linear layers only%s",
            len(experts), _describe_grouped(experts, prefix), hint,
        )
    if odd and out:
        logger.warning(
            "leaving %d linear layer(s) dense: in_features not a multiple of %d (needed for the n:%d pattern): %s",
            len(odd), m, m, _describe_grouped(odd, prefix),
        )
    if not out:
        if odd:
            raise ValueError(
                f"no prunable layers: all {len(odd)} selected linear layers have in_features not divisible by {m} "
                f"(shapes are out x in): {_describe_grouped(odd, prefix)}"
            )
        why = "no nn.Linear layers in the decoder blocks"
        if experts:
            stacked = _describe_grouped(experts, prefix)
            why += f" (their mixture-of-experts weights are stacked 3-D parameters: {stacked})"
        if include or exclude:
            why = f"no linear layer matches include={list(include or [])}, exclude={list(exclude or [])}"
        raise ValueError(f"no prunable layers selected: {why}; layer names look like {prefix}.0.<sub>")
    _check_every_pattern_matches(prefix, blocks, include, exclude)
    return out


def _check_every_pattern_matches(
    prefix: str, blocks: nn.ModuleList, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> None:
    """A ValueError naming each include or exclude pattern that matches no linear layer of the blocks: a typo in
    an exclude pattern would otherwise prune the layers it meant to keep dense, in silence."""
    names = [f"{prefix}.{i}.{sub}" for i, block in enumerate(blocks)
             for sub, mod in block.named_modules() if sub and isinstance(mod, nn.Linear)]
    for kind, patterns in (("include", include), ("exclude", exclude)):
        missed = [p for p in patterns or () if not any(name_matches(n, p) for n in names)]
        if missed:
            subs = sorted({n.split(".", len(prefix.split(".")) + 1)[-1] for n in names})
            raise ValueError(
                f"{kind} pattern(s) {missed} match no linear layer of the decoder blocks (a typo?); the layers are "
                f"{prefix}.<block>.<name> with names {subs[:12]}{' ...' if len(subs) > 12 else ''}"
            )
