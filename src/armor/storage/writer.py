"""Writing pruned model folders (safetensors + JSON only).

Folder format ``armor-model-v2`` (what :func:`save_pruned` / :func:`save_pruned_streamed` write) is a Hugging
Face model folder that ``AutoModelForCausalLM.from_pretrained`` loads once ``armor`` is imported
(:mod:`armor.storage.hf_quantizer`):

* ``model.safetensors``: the model's state dict under its own keys; a pruned layer ``<name>`` contributes its
  packed tensors ``<name>.values``, ``<name>.indices`` (uint8), ``<name>.a_blocks`` / ``<name>.b_blocks``
  (ARMOR only) and ``<name>.bias``, plus its guard ``<name>.weight``: an empty uint8 tensor (no data) that makes an
  architecture class called directly without armor raise instead of loading random weights (:mod:`.guard`).
  Tied parameters (``lm_head.weight`` tied to the embeddings) are stored once, as ``save_pretrained`` does; the
  file's metadata records ``{"format": "pt", "armor_format": ..., "armor_aliases": {dropped key: kept key},
  "armor_weights_sha256": ...}``: the SHA-256 of the file's tensor table and data, also in ``config.json``, so a
  folder mixing two saves is refused on load (:func:`armor.storage.hf_quantizer.check_same_save`).
* ``config.json``: the model's config with ``"model_type": "armor"`` (so that transformers without armor refuses
  the folder) plus ``quantization_config = {"quant_method": "armor", "format": "armor-model-v2",
  "base_model_type": ..., "layers": {name: spec}, "layer_dtypes": {name: dtype}, "versions": {...},
  "run": {...}, "weights_sha256": ...}``.  ``run`` is the provenance of the pruning run (method, options,
  pattern, calibration, records, and whatever else the pipeline passes as ``run_info``).  It lives inside
  ``quantization_config`` rather than in a side file so that ``save_pretrained`` of a loaded model (which
  rewrites ``config.json`` from the config object and copies nothing else) keeps it.  No ``sparsity_config`` key
  is written: serving engines that find one take the folder for a compressed-tensors checkpoint and refuse it.
* ``generation_config.json`` and the tokenizer files, as ``save_pretrained`` writes them.

One writer serves both ways a pruned model exists: in memory (:func:`save_pruned`) and as per-layer files next to
a checkpoint that was never loaded whole (:func:`save_pruned_streamed`); both go through :func:`write_folder`, which
writes one tensor at a time and ``config.json`` last, so a killed save never looks finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import GenerationConfig

from ..models import LinearExperts, set_module
from ..runtime import empty_module_from_spec
from ..version import __version__
from .atomic import write_json_atomic, write_safetensors_streamed
from .checkpoint import (
    ShardReader,
    meta_skeleton,
    open_safetensors,
    release_memory,
    tied_head_keys,
    untie_distinct_head,
)
from .conversion import checkpoint_view
from .guard import guard_keys, guard_tensor, keep_guards
from .hf_quantizer import MODEL_FORMAT, MODEL_TYPE, QUANT_METHOD, WEIGHTS_DIGEST_KEY, ArmorConfig, mark_armored
from .resume import layer_file

__all__ = [
    "WEIGHTS_NAME",
    "TensorEntry",
    "save_pruned",
    "save_pruned_streamed",
    "mark_pruned",
    "carry_armor_config",
    "write_folder",
    "pruned_modules",
    "plain_config_dict",
    "library_versions",
]

WEIGHTS_NAME = "model.safetensors"
#: ``(key, shape, dtype, load)`` of one tensor to write; ``load()`` is called only when it is written.
TensorEntry = tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]


def pruned_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The packed pruned modules of ``model`` (anything with ``spec()`` and ``dense_weight()``), by name."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if name and callable(getattr(mod, "spec", None)) and callable(getattr(mod, "dense_weight", None))
    }


def library_versions() -> dict[str, str]:
    """Versions of armor, torch and transformers, recorded in a saved model's config."""
    return {"armor": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def plain_config_dict(config: Any) -> dict[str, Any]:
    """A model config as a dict without quantisation or armor sections (a GGUF-loaded model carries one)."""
    d = config.to_dict()
    quant = d.pop("quantization_config", None)
    d.pop("armor", None)
    if d.get("model_type") == MODEL_TYPE and isinstance(quant, Mapping):  # a loaded pruned model's config
        d["model_type"] = quant.get("base_model_type")
    return d


def _json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values (tensors, paths, dtypes as strings), as it will read back from config.json."""
    return json.loads(json.dumps(obj, default=str))


def _main_dtype(entries: list[TensorEntry], dtypes: Mapping[str, str]) -> str:
    """The dtype name of the first floating-point tensor (the embeddings, in every HF causal LM)."""
    for _, _, dt, _ in entries:
        if dt.is_floating_point:
            return str(dt).removeprefix("torch.")
    return next(iter(dtypes.values()), "float32")


def write_folder(
    out_dir: str | Path,
    entries: list[TensorEntry],
    aliases: Mapping[str, str],
    config: dict[str, Any],
    section: Mapping[str, Any],
    specs: Mapping[str, dict[str, Any]],
    dtypes: Mapping[str, str],
    generation_config: Any = None,
    tokenizer: Any = None,
    *,
    unfused_experts: Sequence[str] = (),
) -> Path:
    """Write a pruned model folder (format ``armor-model-v2``, see the module docstring).

    ``entries`` are ``(key, shape, dtype, load)`` of every tensor to store, ``aliases`` the keys left out because
    they share storage with a stored one (tied parameters), ``config`` the plain model config, ``section`` the
    run's provenance, ``specs`` / ``dtypes`` the pruned layers' module specs and dtype names.  Weights are written
    one tensor at a time, then generation config and tokenizer, then ``config.json`` (last: a folder without it is
    never taken for a finished one).  ``unfused_experts`` names the mixture-of-experts modules stored as
    per-expert layers (:class:`armor.models.LinearExperts`).  The guard tensors (:mod:`.guard`) are added where
    ``entries`` lack them.
    """
    present = {key for key, *_ in entries}
    guards = [key for key in guard_keys(specs, unfused_experts) if key not in present]
    entries = [*entries, *((key, (0,), torch.uint8, guard_tensor) for key in guards)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    meta = {"format": "pt", "armor_format": MODEL_FORMAT, "armor_aliases": json.dumps(dict(aliases))}
    digest = write_safetensors_streamed(
        out / WEIGHTS_NAME, entries, meta, after_each=lambda nbytes: release_memory() if nbytes > 16 << 20 else None,
        digest_key=WEIGHTS_DIGEST_KEY,
    )
    if generation_config is not None:
        try:
            generation_config.save_pretrained(out)
        except Exception:  # a generation config that does not validate is not worth failing the save for
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    quant = _armor_config(specs, dtypes, section, unfused_experts, config.get("model_type"))
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "armor", "sparsity_config")}
    if cfg.get("dtype") is None:
        # from_pretrained's default dtype="auto" reads it here; without it, transformers opens the weights
        # before any armor hook could check them.
        cfg["dtype"] = _main_dtype(entries, dtypes)
    cfg["quantization_config"] = {**_json_safe(quant.to_dict()), "weights_sha256": digest}
    cfg["model_type"] = MODEL_TYPE  # transformers without armor refuses the folder instead of loading random layers
    write_json_atomic(cfg, out / "config.json")
    (out / "armor.safetensors").unlink(missing_ok=True)  # an armor 0.1 (format v1) save into the same folder
    return out


def _dedupe(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tied parameters (embeddings / lm_head) share storage: keep each tensor once, the rest as aliases."""
    kept: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in kept:
            aliases[key] = kept[ident]
        else:
            kept[ident] = key
            tensors[key] = t
    return tensors, aliases


def _provenance(model: nn.Module) -> dict[str, Any]:
    """The run provenance a loaded pruned model carries (so that re-saving it keeps it), else ``{}``."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(quant, ArmorConfig):
        return dict(quant.run)
    if isinstance(quant, Mapping) and quant.get("quant_method") == QUANT_METHOD:
        return dict(quant.get("run", {}))
    return {}


def save_pruned(
    model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None, run_info: Mapping[str, Any] | None = None
) -> Path:
    """Write the pruned ``model`` (in memory) as a folder that :func:`load_pruned` and ``from_pretrained`` read.

    ``run_info`` (method, options, calibration, records, ...) is stored as the folder's provenance; without it, a
    model loaded from a pruned folder keeps the provenance it was loaded with.
    """
    mods = pruned_modules(model)
    if not mods:
        raise ValueError(
            "the model has no pruned (armor) layers; prune it first (armor.prune) or save it with save_pretrained"
        )
    tensors, aliases = _dedupe(model.state_dict())
    entries = [(k, tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in tensors.items()]
    specs, dtypes, experts = _packed_layout(model, mods)
    info = dict(run_info) if run_info is not None else _provenance(model)
    config = plain_config_dict(model.config)
    tied = tied_head_keys(model)
    if tied is not None and tied[1] in tensors:  # a head kept apart from the embeddings (its config says tied)
        config["tie_word_embeddings"] = False
    return write_folder(
        out_dir, entries, aliases, config, info, specs, dtypes,
        getattr(model, "generation_config", None), tokenizer, unfused_experts=experts,
    )


def _packed_layout(model: nn.Module, mods: Mapping[str, nn.Module]) -> tuple[dict, dict, list[str]]:
    """What a folder records about ``model``'s packed layers ``mods``: their specs, their dtype names and the
    mixture-of-experts modules stored as per-expert layers."""
    specs = {name: mod.spec() for name, mod in mods.items()}
    dtypes = {name: str(mod.dtype).removeprefix("torch.") for name, mod in mods.items()}
    experts = [name for name, mod in model.named_modules() if isinstance(mod, LinearExperts)]
    return specs, dtypes, experts


def _armor_config(specs: Mapping, dtypes: Mapping, run: Mapping[str, Any], experts: Sequence[str],
                  base_model_type: str | None) -> ArmorConfig:  # fmt: skip
    """The quantisation section of a folder with these packed layers, stamped with this run and these versions."""
    return ArmorConfig(
        layers=specs, layer_dtypes=dtypes, versions=library_versions(), run=_json_safe(dict(run)),
        unfused_experts=experts, base_model_type=base_model_type,
    )  # fmt: skip


def carry_armor_config(model: nn.Module, quant: ArmorConfig) -> nn.Module:
    """Make ``model`` carry a pruned folder's section as both loaders leave it: on its config (serialised with
    ``model_type: armor``, :func:`mark_armored`), the guards in its ``state_dict()``
    (:func:`armor.storage.guard.keep_guards`) and no weight conversions (from_pretrained records none for a
    pruned folder; without that record, save_pretrained would rename the per-expert keys).  ``save_pretrained``
    of it then writes a pruned folder."""
    model.config.quantization_config = quant
    mark_armored(model.config, model)
    keep_guards(model)
    model._weight_conversions = []
    return model


def mark_pruned(model: nn.Module, run_info: Mapping[str, Any] | None = None) -> nn.Module:
    """Give an in-memory pruned ``model`` what a model loaded from a pruned folder carries
    (:func:`carry_armor_config`), so that its ``save_pretrained`` writes a pruned folder that armor loads and
    transformers without armor refuses, instead of a plain folder whose pruned layers would load as random
    weights.  A model without pruned layers is returned as it is."""
    mods = pruned_modules(model)
    if not mods:
        return model
    specs, dtypes, experts = _packed_layout(model, mods)
    return carry_armor_config(model, _armor_config(specs, dtypes, run_info or {}, experts, model.config.model_type))


def save_pruned_streamed(
    model_path: str | Path,
    out_dir: str | Path,
    specs: Mapping[str, dict[str, Any]],
    dtypes: Mapping[str, str],
    *,
    run_info: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    reader: ShardReader | None = None,
) -> Path:
    """Write the folder :func:`save_pruned` writes without the model in memory: pruned layers come from their
    layer files in ``out_dir/layers/`` (where the run's jobs wrote them), every other tensor from the checkpoint
    (floating point cast to ``dtype``), one tensor at a time."""
    model = meta_skeleton(model_path)
    reader = checkpoint_view(reader or ShardReader(model_path), model)  # the model's keys, its experts unfused
    untie_distinct_head(model, reader, model_path)  # as the run read it
    for name, spec in specs.items():
        set_module(model, name, empty_module_from_spec(spec, dtype=getattr(torch, dtypes[name]), device="meta"))
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}  # tied parameters appear under several names: one tensor, aliases
    for key, t in state.items():
        groups.setdefault(id(t), []).append(key)

    def from_layer(name: str, sub: str) -> Callable[[], Tensor]:
        def load() -> Tensor:
            with open_safetensors(layer_file(out_dir, name)) as f:
                return f.get_tensor(sub)

        return load

    def from_checkpoint(key: str) -> Callable[[], Tensor]:
        return lambda: reader.load([key], dtype)[key]

    entries: list[TensorEntry] = []
    aliases: dict[str, str] = {}
    for keys in groups.values():
        key, t = keys[0], state[keys[0]]
        aliases.update({k: key for k in keys[1:]})
        parent, _, sub = key.rpartition(".")
        if parent in specs:
            load, dt = from_layer(parent, sub), t.dtype
        else:
            src = next((k for k in keys if k in reader), None)
            if src is not None:
                load, dt = from_checkpoint(src), (dtype if t.is_floating_point() else t.dtype)
            elif not t.is_meta:  # a persistent buffer computed at construction
                load, dt = (lambda t=t: t), t.dtype
            else:
                raise KeyError(f"the checkpoint in {model_path} has no tensor for {key}")
        entries.append((key, tuple(t.shape), dt, load))
    try:
        generation_config = GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except Exception:  # no (valid) generation config: not worth failing the save for
        generation_config = None
    cfg = plain_config_dict(model.config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    return write_folder(
        out_dir, entries, aliases, cfg, dict(run_info or {}), specs, dtypes, generation_config, tokenizer,
        unfused_experts=reader.unfused_experts,
    )
