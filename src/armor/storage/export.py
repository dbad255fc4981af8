"""``export_dense``: a pruned model as a plain Hugging Face folder (pruned layers multiplied out to ``nn.Linear``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import LinearExperts, restack_experts, set_module
from .plain import load_tokenizer
from .reader import load_pruned
from .writer import pruned_modules

__all__ = ["export_dense"]

log = logging.getLogger(__name__)


#: files a Hugging Face tokenizer is saved as (``save_pretrained`` of the fast and slow tokenizers)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja")


def _drop_stale_indexes(out: Path) -> None:
    """Remove a weights index that names files the export did not write (a sharded model exported over by a
    single file): a loader that prefers the index would fail, or read another model's shards."""
    for index in out.glob("*.safetensors.index.json"):
        try:
            files = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            files = {""}
        if not files or any(not (out / f).is_file() for f in files):
            log.warning("%s: removed %s, left from what was there before (it names files this export did not "
                        "write)", out, index.name)
            index.unlink()


def _drop_stale_tokenizer(out: Path) -> None:
    """The pruned folder has no tokenizer: remove the tokenizer files an earlier model left in ``out``, so the
    export is never paired with another model's tokenizer in silence."""
    stale = [name for name in _TOKENIZER_FILES if (out / name).is_file()]
    for name in stale:
        (out / name).unlink()
    if stale:
        log.warning("%s: the pruned folder has no tokenizer; removed the tokenizer files left from what was there "
                    "before (%s)", out, ", ".join(stale))


@torch.no_grad()
def export_dense(path_or_model: str | Path | nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a plain Hugging Face folder (pruned layers as dense ``nn.Linear``) that ``from_pretrained`` loads.

    The pruned zeros and the folded ARMOR wrappers are multiplied out, so any HF tool can run the result; the
    sparsity speed-up and compression are lost.  A model passed in is restored before returning.
    """
    if isinstance(path_or_model, (str, Path)):
        model = load_pruned(path_or_model)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(path_or_model)
            except Exception:  # a folder without tokenizer files still exports
                tokenizer = None
    else:
        model = path_or_model
    swapped = pruned_modules(model)
    if not swapped:
        raise ValueError("the model has no pruned (armor) layers to export")
    config = model.config
    saved_attrs = {k: config.__dict__.pop(k) for k in ("armor", "quantization_config") if k in config.__dict__}
    saved_quantizer = model.__dict__.pop("hf_quantizer", None)  # else save_pretrained writes a quantized config
    # The loaders record that a pruned folder needed no weight conversions; without that record, save_pretrained
    # writes the dense model in the architecture's checkpoint layout (e.g. Mixtral's per-expert w1/w2/w3).
    saved_conversions = model.__dict__.pop("_weight_conversions", None)
    unfused: dict[str, LinearExperts] = {}
    try:
        for name, mod in swapped.items():
            w = mod.dense_weight()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
            set_module(model, name, lin)
        unfused = restack_experts(model)  # per-expert layers back into the stacked parameters transformers loads
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        _drop_stale_indexes(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        elif isinstance(path_or_model, (str, Path)):  # a folder without one (a caller's model: theirs to pair)
            _drop_stale_tokenizer(out)
    finally:
        for name, mod in unfused.items():
            set_module(model, name, mod)
        for name, mod in swapped.items():
            set_module(model, name, mod)
        config.__dict__.update(saved_attrs)
        if saved_quantizer is not None:
            model.hf_quantizer = saved_quantizer
        if saved_conversions is not None:
            model._weight_conversions = saved_conversions
    return out
