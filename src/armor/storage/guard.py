"""The guard tensors of a pruned folder: an empty tensor at each packed layer's ``weight`` key.

A pruned folder's ``config.json`` says ``"model_type": "armor"``, so ``AutoModelForCausalLM`` without armor refuses
it (:mod:`armor.storage.hf_quantizer`).  An architecture class called directly (``LlamaForCausalLM.from_pretrained``)
never reads ``model_type``: it would report the packed tensors as unexpected keys and leave random weights in every
pruned layer.  So the weights file also holds, for every packed layer ``<name>``, an empty uint8 tensor (shape
``(0,)``, no data bytes) at ``<name>.weight``.  Such a class finds its ``nn.Linear`` weight stored with another
shape and raises (transformers' ``ignore_mismatched_sizes`` is False by default).  A mixture-of-experts module
stored as per-expert layers (:class:`armor.models.LinearExperts`) gets one at each stacked parameter it replaces
(``<experts>.gate_up_proj``, ``<experts>.down_proj``): the architecture expects those keys, not per-expert ones.

Both armor doors accept the guards: ``from_pretrained`` through
:class:`~armor.storage.hf_quantizer.ArmorHfQuantizer` is told to expect them (:func:`expect_guards`), and a model
:func:`armor.storage.load_pruned` fills skips them (:func:`keep_guards`).  A tensor other than a guard at a packed
layer's ``weight`` key is an error (``check_packed_tensors``).  Every writer keeps the guards:
:func:`armor.storage.writer.write_folder` adds them, and a model loaded from a pruned folder holds them in its
whole-model ``state_dict()`` (:func:`keep_guards`), which ``save_pretrained`` and :func:`armor.storage.save_pruned`
write.  They live at the model level only: a packed module's own ``state_dict()`` (layer files, byte counts) and a
decoder block's never hold one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..models import LinearExperts
from ..runtime import ArmorLinear, SparseLinear

__all__ = ["GUARD_SUFFIX", "guard_key", "guard_keys", "guard_tensor", "is_guard", "expect_guards", "keep_guards"]

#: The key a guard takes under its layer's name: where the architecture's ``nn.Linear`` keeps its weight.
GUARD_SUFFIX = "weight"
#: The stacked experts parameters a :class:`~armor.models.LinearExperts` module holds as per-expert layers.
_STACKED = ("gate_up_proj", "down_proj")


def guard_key(layer: str) -> str:
    """The guard's key for the packed layer named ``layer``."""
    return f"{layer}.{GUARD_SUFFIX}"


def guard_keys(layers: Iterable[str], unfused_experts: Iterable[str] = ()) -> list[str]:
    """Every guard key of a folder whose packed layers are ``layers`` and whose experts modules named in
    ``unfused_experts`` are stored as per-expert layers."""
    return [*map(guard_key, layers), *(f"{name}.{p}" for name in unfused_experts for p in _STACKED)]


def guard_tensor() -> Tensor:
    """A guard: an empty uint8 tensor, shape ``(0,)``, zero bytes of data."""
    return torch.empty(0, dtype=torch.uint8)


def is_guard(t: Any) -> bool:
    """Whether ``t`` is a guard tensor."""
    return isinstance(t, Tensor) and t.dtype == torch.uint8 and tuple(t.shape) == (0,)


def _key_pattern(key: str) -> str:
    # Block and expert indices become \d+: transformers searches every unexpected key with one alternation of all
    # patterns, so one pattern per layer would make loading a large mixture-of-experts model quadratic.
    return "^" + r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in key.split(".")) + "$"


def expect_guards(model: nn.Module, layers: Iterable[str], unfused_experts: Iterable[str] = ()) -> None:
    """Tell transformers' loader that the guard keys (:func:`guard_keys`) are expected in the checkpoint: the
    model has no such tensors, and its load report must not list them as unexpected."""
    ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns = {_key_pattern(key) for key in guard_keys(layers, unfused_experts)}
    model._keys_to_ignore_on_load_unexpected = ignored | patterns


def _model_guard_keys(model: nn.Module) -> list[str]:
    # Looked up at each call: a layer exported to nn.Linear (export_dense) has its real weight, no guard.
    packed = [name for name, mod in model.named_modules() if isinstance(mod, (ArmorLinear, SparseLinear))]
    experts = [name for name, mod in model.named_modules() if isinstance(mod, LinearExperts)]
    return guard_keys(packed, experts)


def _add_guards(model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    for key in _model_guard_keys(model):
        state_dict[prefix + key] = guard_tensor()


def _drop_guards(model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Before the modules read their keys: a guard is skipped, any other tensor there stays an unexpected key.
    for key in _model_guard_keys(model):
        if is_guard(state_dict.get(prefix + key)):
            del state_dict[prefix + key]


def keep_guards(model: nn.Module) -> None:
    """Make ``model.state_dict()`` hold the guard tensors of its packed layers and unfused experts, and
    ``model.load_state_dict()`` skip them, so that a model loaded from a pruned folder writes them again when it is
    saved (``save_pretrained``, :func:`armor.storage.save_pruned`) and reads its own state back.  Not before
    transformers loads the weights: it takes the empty model's state-dict keys for the keys to load."""
    if not getattr(model, "_armor_keeps_guards", False):
        model.register_state_dict_post_hook(_add_guards)
        model.register_load_state_dict_pre_hook(_drop_guards)
        model._armor_keeps_guards = True
