"""Saving, loading and exporting pruned models (safetensors + JSON only; nothing is ever unpickled).

A pruned model folder holds ``armor.safetensors`` (the whole state dict, pruned layers in packed form), the
model's ``config.json`` with an extra ``"armor"`` section (method, options, calibration, per-layer module
specs, versions), the generation config and the tokenizer.  The weights file has its own name on purpose:
pointing ``AutoModelForCausalLM.from_pretrained`` at the folder fails loudly instead of silently loading
random weights for the packed layers; use :func:`load_pruned` (``armor.load``) or :func:`export_dense` for a
plain HF folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import get_module, set_module
from .prune import atomic_save_safetensors

__all__ = [
    "WEIGHTS_NAME",
    "MODEL_FORMAT",
    "save_pruned",
    "load_pruned",
    "load_model",
    "load_tokenizer",
    "read_armor_config",
    "is_pruned_folder",
    "export_dense",
    "pruned_modules",
    "plain_config_dict",
    "library_versions",
    "write_json_atomic",
    "resolve_dtype",
]

WEIGHTS_NAME = "armor.safetensors"
MODEL_FORMAT = "armor-model-v1"


def pruned_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The packed pruned modules of ``model`` (anything with ``spec()`` and ``dense_weight()``), by name."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if name and callable(getattr(mod, "spec", None)) and callable(getattr(mod, "dense_weight", None))
    }


def library_versions() -> dict[str, str]:
    """Versions of armor, torch and transformers, recorded in a saved model's config."""
    import transformers

    from .. import __version__

    return {"armor": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON through a temporary sibling, fsync and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plain_config_dict(config: Any) -> dict[str, Any]:
    """A model config as a dict without its quantisation section (a GGUF-loaded model carries one)."""
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.pop("armor", None)
    return d


def save_pruned(
    model: nn.Module, tokenizer: Any, out_dir: str | Path, armor_config: Mapping[str, Any] | None = None
) -> Path:
    """Write a pruned model folder loadable with :func:`load_pruned`.

    ``config.json`` is written last, so a folder without it (a killed save) is never taken for a finished one.
    Other files in ``out_dir`` (``layers/``, ``records.jsonl``) are left alone.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)

    state = model.state_dict()
    # Tied parameters (embeddings / lm_head) share storage; safetensors stores each tensor once.
    kept: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in kept:
            aliases[key] = kept[ident]
        else:
            kept[ident] = key
            tensors[key] = t
    meta = {"format": MODEL_FORMAT, "aliases": json.dumps(aliases)}
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME, meta)

    specs = {name: mod.spec() for name, mod in pruned_modules(model).items()}
    dtypes = {name: str(mod.dtype).removeprefix("torch.") for name, mod in pruned_modules(model).items()}
    section = {**dict(armor_config or {}), "format": MODEL_FORMAT, "weights": WEIGHTS_NAME}
    section.update({"layers": specs, "layer_dtypes": dtypes, "versions": library_versions()})
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except Exception:  # a generation config that does not validate is not worth failing the save for
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg = plain_config_dict(model.config)
    cfg["armor"] = section
    write_json_atomic(cfg, out / "config.json")
    return out


def read_armor_config(path: str | Path) -> dict[str, Any] | None:
    """The ``"armor"`` section of ``<path>/config.json``, or ``None`` for a plain HF folder."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    with open(cfg_path) as f:
        cfg = json.load(f)
    return cfg.get("armor")


def is_pruned_folder(path: str | Path) -> bool:
    return read_armor_config(path) is not None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float16`` from ``"float16"``/``"fp16"``/``"half"`` and the like; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "float": "float32",
    }
    name = aliases.get(dtype, dtype)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


def load_pruned(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load a folder written by :func:`save_pruned`: a working model whose outputs equal the saved model's.

    Args:
        dtype: cast floating-point weights to this dtype (default: as saved).
        device: where to put the model (default: CPU).
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..runtime import empty_module_from_spec

    path = Path(path)
    section = read_armor_config(path)
    if section is None:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not a model folder (no config.json): {path}")
        raise ValueError(f"{path} is not an armor-pruned model (config.json has no 'armor' section)")
    weights = path / section.get("weights", WEIGHTS_NAME)
    if not weights.is_file():
        raise FileNotFoundError(f"pruned model weights missing: {weights}")
    dtype = resolve_dtype(dtype)

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "armor"):
        delattr(config, "armor")
    # Parameters on the meta device (no random init of a model we are about to overwrite); buffers such as
    # rotary frequencies are still computed for real since they are not in the state dict.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, spec in section.get("layers", {}).items():
        get_module(model, name)  # raises with the name when the architecture does not have it
        layer_dtype = getattr(torch, section.get("layer_dtypes", {}).get(name, "float32"))
        set_module(model, name, empty_module_from_spec(spec, dtype=layer_dtype, device="cpu"))

    with safe_open(str(weights), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{weights} is not an armor model weights file")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for dup, src in json.loads(meta.get("aliases", "{}")).items():
        state[dup] = state[src]
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise RuntimeError(f"{weights} did not provide: {', '.join(left[:5])}")
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    model.armor_config = section  # kept off model.config so that a dense export does not inherit it
    return model


def load_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """A pruned folder via :func:`load_pruned`, or a plain HF causal-LM folder via ``from_pretrained``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder not found (no config.json): {path}")
    if is_pruned_folder(path):
        return load_pruned(path, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype) or torch.float32, local_files_only=True
    )
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@torch.no_grad()
def export_dense(path_or_model: str | Path | nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a plain Hugging Face folder (pruned layers as dense ``nn.Linear``) that ``from_pretrained``
    loads.

    The pruned zeros and the folded ARMOR wrappers are multiplied out, so any HF tool can run the result;
    the sparsity speed-up and compression are lost.  A model passed in is restored before returning.
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
    try:
        for name, mod in swapped.items():
            w = mod.dense_weight()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
            set_module(model, name, lin)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = model.config
        saved_armor = config.__dict__.pop("armor", None)
        try:
            model.save_pretrained(out, safe_serialization=True)
        finally:
            if saved_armor is not None:
                config.armor = saved_armor
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    finally:
        for name, mod in swapped.items():
            set_module(model, name, mod)
    return out
