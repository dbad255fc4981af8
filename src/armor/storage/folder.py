"""Pruned model folders: save, load, export (safetensors + JSON only; nothing is ever unpickled).

Folder format ``armor-model-v2`` (what :func:`save_pruned` / :func:`save_pruned_streamed` write) is a Hugging
Face model folder that ``AutoModelForCausalLM.from_pretrained`` loads once ``armor`` is imported
(:mod:`armor.storage.hf_quantizer`):

* ``model.safetensors``: the model's state dict under its own keys; a pruned layer ``<name>`` contributes its
  packed tensors ``<name>.values``, ``<name>.indices`` (uint8), ``<name>.a_blocks`` / ``<name>.b_blocks``
  (ARMOR only) and ``<name>.bias``.  Tied parameters (``lm_head.weight`` tied to the embeddings) are stored once,
  as ``save_pretrained`` does; the file's metadata records ``{"format": "pt", "armor_format": ..., "armor_aliases":
  {dropped key: kept key}}``.
* ``config.json``: the model's config plus ``quantization_config = {"quant_method": "armor", "format":
  "armor-model-v2", "layers": {name: spec}, "layer_dtypes": {name: dtype}, "versions": {...}, "run": {...}}``.
  ``run`` is the provenance of the pruning run (method, options, pattern, calibration, records, and whatever
  else the pipeline passes as ``run_info``).  It lives inside ``quantization_config`` rather than in a side file
  so that ``save_pretrained`` of a loaded model (which rewrites ``config.json`` from the config object and
  copies nothing else) keeps it.  No ``sparsity_config`` key is written: serving engines that find one take the
  folder for a compressed-tensors checkpoint and refuse it.
* ``generation_config.json`` and the tokenizer files, as ``save_pretrained`` writes them.

:func:`read_armor_config` returns the flat view the CLI reports from: ``run``'s keys plus ``format``,
``weights``, ``layers``, ``layer_dtypes`` and ``versions``.

Format ``armor-model-v1`` (``armor.safetensors`` + an ``"armor"`` section in ``config.json``, written by armor
0.1) still loads through :func:`load_pruned` (``armor.load``); ``from_pretrained`` cannot read it: load it with
``armor.load`` and write it again with :func:`save_pruned` to upgrade it.

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
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..models import LinearExperts, get_module, restack_experts, set_module
from ..runtime import empty_module_from_spec
from ..version import __version__
from .atomic import write_json_atomic, write_safetensors_streamed
from .checkpoint import CheckpointError, ShardReader, meta_skeleton, open_safetensors, release_memory
from .hf_quantizer import MODEL_FORMAT, QUANT_METHOD, ArmorConfig, install_packed_modules
from .resume import layer_file

__all__ = [
    "WEIGHTS_NAME",
    "MODEL_FORMAT",
    "LEGACY_WEIGHTS_NAME",
    "LEGACY_MODEL_FORMAT",
    "save_pruned",
    "save_pruned_streamed",
    "write_folder",
    "load_pruned",
    "load_model",
    "load_tokenizer",
    "read_armor_config",
    "is_pruned_folder",
    "export_dense",
    "pruned_modules",
    "plain_config_dict",
    "library_versions",
    "resolve_dtype",
]

WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "armor.safetensors"
LEGACY_MODEL_FORMAT = "armor-model-v1"

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
    d.pop("quantization_config", None)
    d.pop("armor", None)
    return d


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float16`` from ``"float16"``/``"fp16"``/``"half"`` and the like; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(dtype, dtype)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


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
    per-expert layers (:class:`armor.models.LinearExperts`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    meta = {"format": "pt", "armor_format": MODEL_FORMAT, "armor_aliases": json.dumps(dict(aliases))}
    write_safetensors_streamed(
        out / WEIGHTS_NAME, entries, meta, after_each=lambda nbytes: release_memory() if nbytes > 16 << 20 else None
    )
    if generation_config is not None:
        try:
            generation_config.save_pretrained(out)
        except Exception:  # a generation config that does not validate is not worth failing the save for
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    quant = ArmorConfig(
        layers=specs, layer_dtypes=dtypes, versions=library_versions(), run=_json_safe(dict(section)),
        unfused_experts=unfused_experts,
    )
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "armor", "sparsity_config")}
    if cfg.get("dtype") is None:
        # from_pretrained's default dtype="auto" reads it here; without it, transformers opens the weights
        # before any armor hook could check them.
        cfg["dtype"] = _main_dtype(entries, dtypes)
    cfg["quantization_config"] = _json_safe(quant.to_dict())
    write_json_atomic(cfg, out / "config.json")
    (out / LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)  # an armor 0.1 save into the same folder: superseded
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
    specs = {name: mod.spec() for name, mod in mods.items()}
    dtypes = {name: str(mod.dtype).removeprefix("torch.") for name, mod in mods.items()}
    info = dict(run_info) if run_info is not None else _provenance(model)
    experts = [name for name, mod in model.named_modules() if isinstance(mod, LinearExperts)]
    return write_folder(
        out_dir, entries, aliases, plain_config_dict(model.config), info, specs, dtypes,
        getattr(model, "generation_config", None), tokenizer, unfused_experts=experts,
    )


def save_pruned_streamed(
    model_path: str | Path,
    out_dir: str | Path,
    specs: Mapping[str, dict[str, Any]],
    dtypes: Mapping[str, str],
    run_dir: str | Path,
    *,
    run_info: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    reader: ShardReader | None = None,
) -> Path:
    """Write the folder :func:`save_pruned` writes without the model in memory: pruned layers come from their
    layer files in ``run_dir/layers/``, every other tensor from the checkpoint (floating point
    cast to ``dtype``), one tensor at a time."""
    reader = reader or ShardReader(model_path)
    model = meta_skeleton(model_path)
    for name, spec in specs.items():
        set_module(model, name, empty_module_from_spec(spec, dtype=getattr(torch, dtypes[name]), device="meta"))
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}  # tied parameters appear under several names: one tensor, aliases
    for key, t in state.items():
        groups.setdefault(id(t), []).append(key)

    def from_layer(name: str, sub: str) -> Callable[[], Tensor]:
        def load() -> Tensor:
            with open_safetensors(layer_file(run_dir, name)) as f:
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
        out_dir, entries, aliases, cfg, dict(run_info or {}), specs, dtypes, generation_config, tokenizer
    )


def _read_config_json(path: Path) -> dict[str, Any] | None:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    return cfg


def _armor_quant(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return quant
    return None


def read_armor_config(path: str | Path) -> dict[str, Any] | None:
    """What ``<path>/config.json`` says about the pruning, or ``None`` for a folder that is not armor-pruned.

    The dict holds the run's provenance (``method``, ``options``, ``pattern``, ``calibration``, ``records`` and
    any other ``run_info`` key the run stored) plus ``format``, ``weights`` (file name), ``layers`` (name ->
    module spec), ``layer_dtypes``, ``versions`` and ``unfused_experts`` (mixture-of-experts modules stored as
    per-expert layers; see :func:`armor.storage.hf_quantizer.install_packed_modules`); the same keys for both
    folder formats.
    """
    cfg = _read_config_json(Path(path))
    if cfg is None:
        return None
    quant = _armor_quant(cfg)
    if quant is not None:
        run = quant.get("run") or {}
        return {
            **run,
            "format": quant.get("format"),
            "weights": WEIGHTS_NAME,
            "layers": quant.get("layers", {}),
            "layer_dtypes": quant.get("layer_dtypes", {}),
            "versions": quant.get("versions", {}),
            "unfused_experts": quant.get("unfused_experts", []),
        }
    legacy = cfg.get("armor")
    if isinstance(legacy, dict):
        return {"weights": LEGACY_WEIGHTS_NAME, "unfused_experts": [], **legacy}
    return None


def is_pruned_folder(path: str | Path) -> bool:
    """Whether ``path`` is an armor-pruned model folder (either format)."""
    return read_armor_config(path) is not None


def _read_weights(weights: Path, expected_format: str, format_key: str) -> tuple[dict[str, Tensor], dict[str, str]]:
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


def _skeleton(config: Any) -> nn.Module:
    # Parameters on the meta device (no random init of a model about to be overwritten); buffers such as rotary
    # frequencies are still computed for real since they are not in the state dict.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _fill(
    model: nn.Module, state: dict[str, Tensor], aliases: Mapping[str, str], weights: Path, dtype: torch.dtype | None
) -> None:
    """Load ``state`` into the skeleton ``model`` (floating-point tensors cast to ``dtype`` when given; computed
    buffers such as rotary frequencies keep theirs, as from_pretrained does); tied parameters the file stores once
    are tied again."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.config.dtype = dtype
    for dup, src in aliases.items():
        if src in state and dup not in state:
            state[dup] = state[src]
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(
            f"{weights} holds tensors the model does not have: {', '.join(result.unexpected_keys[:5])} "
            "(the weights and config.json disagree)"
        )
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise CheckpointError(f"{weights} does not provide: {', '.join(left[:5])}")
    for mod in pruned_modules(model).values():
        mod.requires_grad_(False)  # frozen, as built: a frozen packed module caches its unpacked form


def _load_v2(path: Path, quant: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    armor_cfg = ArmorConfig.from_dict(quant)  # validates the format and the layer specs
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"pruned model folder {path} has no {WEIGHTS_NAME}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.__dict__.pop("quantization_config", None)  # from_config must build the plain architecture
    model = _skeleton(config)
    install_packed_modules(model, armor_cfg.layers, armor_cfg.layer_dtypes, "meta", armor_cfg.unfused_experts)
    state, aliases = _read_weights(weights, MODEL_FORMAT, "armor_format")
    _fill(model, state, aliases, weights, dtype)
    # Kept on the config, as from_pretrained keeps it: save_pretrained of this model writes a loadable folder.
    model.config.quantization_config = armor_cfg
    return model


def _load_v1(path: Path, section: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    weights = path / section.get("weights", LEGACY_WEIGHTS_NAME)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.__dict__.pop("armor", None)
    model = _skeleton(config)
    for name in section.get("layers", {}):
        get_module(model, name)  # raises with the name when the architecture does not have it
    install_packed_modules(model, section.get("layers", {}), section.get("layer_dtypes", {}), "meta")
    state, aliases = _read_weights(weights, LEGACY_MODEL_FORMAT, "format")
    _fill(model, state, aliases, weights, dtype)
    return model


def load_pruned(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load a pruned model folder (format v2, or v1 written by armor 0.1): a working model whose outputs equal
    the saved model's, pruned layers as packed :class:`armor.runtime.ArmorLinear` / ``SparseLinear`` modules.

    Args:
        dtype: cast floating-point weights to this dtype (default: as saved).
        device: where to put the model (default: CPU).
    """
    path = Path(path)
    cfg = _read_config_json(path)
    if cfg is None:
        raise FileNotFoundError(f"not a model folder (no config.json): {path}")
    dtype = resolve_dtype(dtype)
    quant = _armor_quant(cfg)
    if quant is not None:
        model = _load_v2(path, quant, dtype)
    elif isinstance(cfg.get("armor"), dict):
        section = cfg["armor"]
        if section.get("format") != LEGACY_MODEL_FORMAT:
            raise ValueError(
                f"{path} is an armor folder of unknown format {section.get('format')!r}; upgrade armor to load it"
            )
        model = _load_v1(path, section, dtype)
    else:
        raise ValueError(
            f"{path} is not an armor-pruned model (config.json has no quantization_config with "
            f"quant_method 'armor'); load a plain model with armor.storage.load_model or from_pretrained"
        )
    if device is not None:
        model = model.to(device)
    model.eval()
    model.armor_config = read_armor_config(path)  # the flat view (provenance + layers) the CLI reports from
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
    for weights in sorted(path.glob("*.safetensors")):
        with open_safetensors(weights):  # a clear error for a truncated file instead of a deep traceback
            pass
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype) or torch.float32, local_files_only=True
    )
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder."""
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


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
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    finally:
        for name, mod in unfused.items():
            set_module(model, name, mod)
        for name, mod in swapped.items():
            set_module(model, name, mod)
        config.__dict__.update(saved_attrs)
        if saved_quantizer is not None:
            model.hf_quantizer = saved_quantizer
    return out
