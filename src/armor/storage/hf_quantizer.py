"""Loading pruned folders with plain ``AutoModelForCausalLM.from_pretrained``: transformers' quantizer hooks.

transformers loads pre-quantised checkpoints through two registries (``transformers.quantizers.auto``): a
*quantization config* class chosen by ``config.json``'s ``quantization_config.quant_method``, and an
*HfQuantizer* that may rewrite the freshly built (meta-device) model before the weights are read.  armor
registers both under ``quant_method = "armor"`` when ``armor`` (or ``armor.storage``) is imported:

* :class:`ArmorConfig` holds what a pruned folder's ``quantization_config`` says: the folder format, the packed
  module spec of every pruned layer, their dtypes, the library versions and the run's provenance (``run``).
* :class:`ArmorHfQuantizer` replaces each ``nn.Linear`` named in ``layers`` by an EMPTY packed module
  (:class:`armor.runtime.ArmorLinear` / :class:`armor.runtime.SparseLinear` built by
  :func:`armor.runtime.empty_module_from_spec` on the meta device) before loading; the packed tensors
  (``<name>.values``, ``.indices``, ``.a_blocks``, ``.b_blocks``, ``.bias``) then load by key like any other
  parameter.  No dense weight is ever built, nothing runs remote code and nothing is unpickled.

The same replacement (:func:`install_packed_modules`) serves :func:`armor.storage.load_pruned`, so both doors
build the same model.

A pruned folder must never load as garbage in a process that did not import ``armor``: transformers skips a
``quant_method`` it does not know with a warning and would fill every pruned layer with random weights.  So the
folder's ``config.json`` says ``"model_type": "armor"`` (the architecture's own type is kept as
``quantization_config.base_model_type``).  Without ``armor`` imported, ``AutoConfig`` / ``AutoModelForCausalLM``
refuse the folder ("model type `armor` ... does not recognize this architecture"); with it imported,
:class:`ArmorModelConfig` (registered under that type) hands back the base architecture's config with the
quantisation section, and loading proceeds as above.  A model loaded either way keeps writing ``"armor"`` when it is
saved again (:func:`mark_armored`), so a re-saved folder is refused the same way.  An architecture class called
directly (``LlamaForCausalLM.from_pretrained``) never reads ``model_type``; the guard tensors stored at each packed
layer's ``weight`` key make it raise (:mod:`armor.storage.guard`).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..models import get_module, set_module, unfuse_experts
from ..runtime import empty_module_from_spec
from ..runtime.packing import check_positions
from .checkpoint import CheckpointError, check_covered, open_safetensors
from .guard import expect_guards, guard_key, guard_keys, keep_guards

__all__ = [
    "QUANT_METHOD", "MODEL_FORMAT", "ArmorConfig", "ArmorHfQuantizer", "install_packed_modules", "check_weight_files",
    "check_packed_tensors", "check_packed_positions", "check_layer_positions", "check_same_save", "WEIGHTS_DIGEST_KEY",
    "check_folder_format", "MODEL_TYPE", "ArmorModelConfig", "mark_armored",
]

logger = logging.getLogger(__name__)

QUANT_METHOD = "armor"
MODEL_FORMAT = "armor-model-v2"
#: ``config.json``'s ``model_type`` of a pruned folder: unknown to transformers unless armor is imported.
MODEL_TYPE = "armor"
#: the weights file's metadata key for the SHA-256 armor's writer also records in ``config.json``
WEIGHTS_DIGEST_KEY = "armor_weights_sha256"

_SPEC_KINDS = ("armor", "sparse")


def _check_spec(name: str, spec: Any) -> None:
    if not isinstance(spec, Mapping) or spec.get("type") not in _SPEC_KINDS:
        raise ValueError(f"quantization_config.layers[{name!r}] is not an armor layer spec: {spec!r}")
    for key in ("in_features", "out_features"):
        if not isinstance(spec.get(key), int) or spec[key] < 1:
            raise ValueError(f"quantization_config.layers[{name!r}] has no valid {key!r}: {spec!r}")


class ArmorConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an armor-pruned folder (``quant_method = "armor"``).

    Args:
        layers: pruned layer name -> module spec (``ArmorLinear.spec()`` / ``SparseLinear.spec()``).
        layer_dtypes: pruned layer name -> dtype name the packed tensors were saved in (``"float16"``...).
        format: the folder format; only :data:`MODEL_FORMAT` is understood.
        versions: armor / torch / transformers versions that wrote the folder.
        run: provenance of the pruning run (method, options, pattern, calibration, records, ...).
        unfused_experts: mixture-of-experts modules stored as one layer per expert matrix
            (:class:`armor.models.LinearExperts`), rebuilt that way before the weights load.
        base_model_type: the architecture's own ``model_type`` (``config.json`` says ``"armor"``).
        weights_sha256: the SHA-256 of the weights file armor saved with this config (also in that file's
            metadata, :data:`WEIGHTS_DIGEST_KEY`): a folder mixing two saves is refused (:func:`check_same_save`).
            Not serialised again: ``save_pretrained`` writes a new weights file that records none.
    """

    def __init__(
        self,
        layers: Mapping[str, Mapping[str, Any]] | None = None,
        layer_dtypes: Mapping[str, str] | None = None,
        format: str = MODEL_FORMAT,  # noqa: A002 - the key's name in config.json
        versions: Mapping[str, str] | None = None,
        run: Mapping[str, Any] | None = None,
        unfused_experts: Iterable[str] | None = None,
        base_model_type: str | None = None,
        weights_sha256: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.weights_sha256 = weights_sha256
        self.base_model_type = base_model_type
        self.format = format
        self.layers = {str(k): dict(v) for k, v in (layers or {}).items()}
        self.layer_dtypes = {str(k): str(v) for k, v in (layer_dtypes or {}).items()}
        self.versions = dict(versions or {})
        self.run = dict(run or {})
        self.unfused_experts = [str(name) for name in (unfused_experts or [])]
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():  # keys a newer armor wrote: kept, so a re-save does not drop them
            setattr(self, key, value)
        self.post_init()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("weights_sha256", None)  # it names the file this config was read with, not the one saved next
        return out

    def post_init(self) -> None:
        check_folder_format(self.format)
        for name, spec in self.layers.items():
            _check_spec(name, spec)
        for name, dt in self.layer_dtypes.items():
            if not isinstance(getattr(torch, dt, None), torch.dtype):
                raise ValueError(f"quantization_config.layer_dtypes[{name!r}] = {dt!r} is not a torch dtype")


def check_folder_format(fmt: Any) -> None:
    """A ValueError unless ``fmt`` (``quantization_config.format``) is :data:`MODEL_FORMAT`, saying what to do:
    upgrade armor for a newer format; for anything else the config is damaged (armor 0.1's format v1 lived under
    config.json's ``armor`` key, never in ``quantization_config``)."""
    if fmt == MODEL_FORMAT:
        return
    found = re.fullmatch(r"armor-model-v(\d+)", fmt) if isinstance(fmt, str) else None
    if found is not None and int(found.group(1)) > int(MODEL_FORMAT.rsplit("v", 1)[1]):
        raise ValueError(
            f"the folder is armor format {fmt!r}, written by a newer armor; this one reads {MODEL_FORMAT!r}: "
            "upgrade armor (pip install -U armor-prune) to load it"
        )
    raise ValueError(
        f"quantization_config.format is {fmt!r}, which no armor writes there (this one writes {MODEL_FORMAT!r}; "
        "armor 0.1's 'armor-model-v1' lived under config.json's 'armor' key): the config is damaged"
    )


def install_packed_modules(
    model: nn.Module,
    layers: Mapping[str, Mapping[str, Any]],
    dtype: torch.dtype | Mapping[str, str] | None,
    device: torch.device | str,
    unfused_experts: Iterable[str] = (),
) -> None:
    """Replace each ``nn.Linear`` of ``model`` named in ``layers`` by an empty packed module of that spec, after
    turning the stacked experts modules named in ``unfused_experts`` into per-expert linear layers.

    ``dtype`` is one dtype for every layer, or a mapping layer name -> dtype name (``float32`` when absent).
    Raises ValueError naming the layer when the model has no such ``nn.Linear`` or its shape differs from the
    spec (the folder was written for another architecture).
    """
    unfuse_experts(model, list(unfused_experts), check=False)  # on meta: nothing to compare yet
    for name, spec in layers.items():
        try:
            target = get_module(model, name)
        except AttributeError:
            raise ValueError(
                f"the pruned folder names layer {name!r}, which {type(model).__name__} does not have; "
                "the folder's config.json and quantization_config disagree"
            ) from None
        if not isinstance(target, nn.Linear):
            raise ValueError(f"pruned layer {name!r} is a {type(target).__name__} in the model, not an nn.Linear")
        shape = (int(spec["out_features"]), int(spec["in_features"]))
        if (target.out_features, target.in_features) != shape:
            raise ValueError(
                f"pruned layer {name!r} is {shape[0]}x{shape[1]} in the folder but "
                f"{target.out_features}x{target.in_features} in the model"
            )
        if isinstance(dtype, Mapping):
            layer_dtype = getattr(torch, dtype.get(name, "float32"))
        else:
            layer_dtype = dtype if dtype is not None else torch.float32
        set_module(model, name, empty_module_from_spec(dict(spec), dtype=layer_dtype, device=device))


def check_weight_files(files: Iterable[str | Path]) -> dict[str, tuple[int, ...]]:
    """Open every safetensors file once (a truncated or corrupt one raises CheckpointError naming it); returns
    every stored tensor's shape, from the headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if str(f).endswith(".safetensors"):
            with open_safetensors(f) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no iteration
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_same_save(files: Iterable[str | Path], expected: str | None, config: str | Path) -> None:
    """Every weights file of a pruned folder was saved together with its ``config`` (``config.json``): armor's
    writer records one SHA-256 in both (``quantization_config.weights_sha256`` and the file's
    :data:`WEIGHTS_DIGEST_KEY` metadata), ``save_pretrained`` records it in neither.  A file copied in from another
    folder, or a config from another save, is a CheckpointError naming both: it would otherwise load and run a
    model with another run's weights under this run's provenance.  Reads only the headers."""
    for f in files:
        if not str(f).endswith(".safetensors"):
            continue
        with open_safetensors(f) as handle:
            found = (handle.metadata() or {}).get(WEIGHTS_DIGEST_KEY)
        if found == expected:
            continue
        raise CheckpointError(
            f"{f} was not saved with {config}: {_says_digest('the file', found)}, "
            f"{_says_digest('the config', expected)}; the folder mixes two saves (a file copied in from another "
            "folder?): copy a pruned folder whole, or save the model again"
        )


def _says_digest(who: str, digest: str | None) -> str:
    return f"{who} records weights SHA-256 {digest[:16]}..." if digest else f"{who} records no weights SHA-256"


def check_packed_tensors(model: nn.Module, layers: Iterable[str], stored: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor of every packed layer is stored with the shape its spec gives; else a ValueError naming them.

    ``from_pretrained`` would otherwise leave a missing tensor as uninitialised memory (NaN logits) with a
    warning only.  A layer's ``weight`` key may hold its guard (shape ``(0,)``, :mod:`armor.storage.guard`), nothing
    else.
    """
    problems = []
    for name in layers:
        guard = stored.get(guard_key(name))
        if guard is not None and tuple(guard) != (0,):
            problems.append(f"{guard_key(name)} is {tuple(guard)} in the weights, a pruned layer stores no weight")
        for key, t in get_module(model, name).state_dict(keep_vars=True).items():
            full = f"{name}.{key}"
            if full not in stored:
                problems.append(f"{full} is missing")
            elif tuple(stored[full]) != tuple(t.shape):
                problems.append(f"{full} is {tuple(stored[full])} in the weights, {tuple(t.shape)} in its spec")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"the pruned folder's weights do not match its layers: {'; '.join(problems[:5])}{more}")


def check_packed_positions(model: nn.Module, layers: Iterable[str], where: str | Path) -> None:
    """A CheckpointError (a ValueError) naming the layer (and ``where`` its weights came from) whose stored
    positions are not what packing writes (:func:`armor.runtime.packing.check_positions`): a damaged index byte
    would otherwise load and give outputs that depend on the kernel that runs."""
    for name in layers:
        mod = get_module(model, name)
        check_layer_positions(mod.indices, mod, name, where)


def check_layer_positions(indices: Tensor, module: nn.Module, name: str, where: str | Path) -> None:
    """:func:`check_packed_positions` for one packed layer ``name`` whose stored ``indices`` belong to ``module``
    (its spec: kept values per row, ``n``, ``m``; it may be on ``meta``)."""
    try:
        check_positions(indices, module.values.shape[1], module.n, module.m)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {name}.indices is damaged: {exc}") from None


class ArmorHfQuantizer(HfQuantizer):
    """Loads armor-pruned folders (pre-pruned only: transformers cannot prune at load time)."""

    requires_calibration = True  # from_pretrained(quantization_config=ArmorConfig()) on a dense model is refused
    quantization_config: ArmorConfig

    load_dtype: torch.dtype | None = None

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # transformers' hook that sees the model's load dtype (resolved from dtype=..., "auto" or the default)
        self.load_dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        files = kwargs.get("checkpoint_files") or []
        stored = check_weight_files(files)
        # The packed layers follow the dtype the model is loaded in, like every other floating-point tensor
        # (from_pretrained(dtype=...) casts all of them); the saved dtypes are the fallback for a caller that
        # never resolved one.
        dtype = self.load_dtype
        layer_dtypes = dtype if isinstance(dtype, torch.dtype) else self.quantization_config.layer_dtypes
        quant = self.quantization_config
        install_packed_modules(model, quant.layers, layer_dtypes, "meta", quant.unfused_experts)
        if any(str(f).endswith(".safetensors") for f in files):
            config = Path(files[0]).parent / "config.json"
            check_same_save(files, quant.weights_sha256, config)
            check_packed_tensors(model, quant.layers, stored)
            # as armor.load: no parameter left random, no stored tensor dropped (a layer's wrappers, a dense block)
            guards = guard_keys(quant.layers, quant.unfused_experts)
            unused = set(stored) - set(model.state_dict(keep_vars=True)) - set(guards)
            where = files[0] if len(files) == 1 else Path(files[0]).parent
            check_covered(model, stored, unused, f"the weights in {where}")
        expect_guards(model, quant.layers, quant.unfused_experts)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # transformers re-creates loaded parameters as trainable; packed layers are frozen (is_trainable is
        # False), and a frozen module may cache its unpacked form between forwards.
        for name in self.quantization_config.layers:
            get_module(model, name).requires_grad_(False)
        check_packed_positions(model, self.quantization_config.layers, getattr(model, "name_or_path", "") or "model")
        mark_armored(model.config, model)
        keep_guards(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # the packed kernels are operators dynamo keeps whole (armor.runtime.ops): generate() may compile the
        # decode step of a static cache as it does for a dense model
        return True


class ArmorModelConfig(PretrainedConfig):
    """``AutoConfig``'s entry for ``model_type = "armor"``: reading such a config gives the base architecture's
    config (``quantization_config.base_model_type``), quantisation section included."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        quant = config_dict.get("quantization_config")
        base = quant.get("base_model_type") if isinstance(quant, Mapping) else None
        if base not in CONFIG_MAPPING or base == MODEL_TYPE:
            raise ValueError(
                f"an armor-pruned config must name its architecture in quantization_config.base_model_type; "
                f"got {base!r}"
            )
        # not marked yet (mark_armored): AutoModel looks the class up in its mapping before the model is built
        return CONFIG_MAPPING[base].from_dict({**config_dict, "model_type": base}, **kwargs)


#: the model each armored config belongs to, by the config's id (weak: a model owns its config, not the reverse)
_MODEL_OF_CONFIG: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def _layer_dtypes_now(config: Any, layers: Iterable[str], stored: Mapping[str, str]) -> dict[str, str]:
    """The packed layers' dtypes as the model holds them now (``.to(torch.bfloat16)`` after loading changes them),
    so a save records what it stores; ``stored`` when the config's model is gone."""
    model = _MODEL_OF_CONFIG.get(id(config))
    if model is None or model.config is not config:
        return dict(stored)
    out = dict(stored)
    for name in layers:
        try:
            out[name] = str(get_module(model, name).dtype).removeprefix("torch.")
        except AttributeError:
            pass  # a layer the model no longer holds: the recorded dtype stays
    return out


def _armored_to_dict(self: Any) -> dict[str, Any]:
    out = super(type(self), self).to_dict()
    quant = out.get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("quant_method") == QUANT_METHOD:
        dtypes = _layer_dtypes_now(self, quant.get("layers", {}), quant.get("layer_dtypes", {}))
        if isinstance(self.quantization_config, ArmorConfig):  # to_diff_dict serialises the object itself
            self.quantization_config.layer_dtypes = dtypes
        out["quantization_config"] = {**quant, "layer_dtypes": dtypes, "base_model_type": out.get("model_type")}
        out["model_type"] = MODEL_TYPE
    return out


_ARMORED: dict[type, type] = {}


def _rebuild_armored(base: type, state: dict[str, Any]) -> Any:
    """Unpickle a marked config: an instance of its architecture's config class, marked again."""
    config = base.__new__(base)
    config.__dict__.update(state)
    mark_armored(config)
    return config


def _armored_reduce(self: Any, protocol: int) -> tuple[Any, ...]:
    # pickle finds a class by module and name, which give the base class: rebuild through it instead
    return _rebuild_armored, (type(self)._armor_base, self.__dict__)


def mark_armored(config: Any, model: nn.Module | None = None) -> None:
    """Make ``config`` serialise with ``model_type = "armor"`` while it holds an armor quantisation section (its
    class becomes a subclass of its own whose ``to_dict`` says so), so ``save_pretrained`` of a loaded pruned model
    writes a folder that transformers without armor refuses instead of loading with random layers.  Given the
    ``model`` the config belongs to, the section it writes records the packed layers' dtypes as they are then."""
    if model is not None:
        _MODEL_OF_CONFIG[id(config)] = model
    base = type(config)
    if getattr(base, "_armor_marked", False):
        return
    if base not in _ARMORED:
        _ARMORED[base] = type(base.__name__, (base,), {
            "to_dict": _armored_to_dict, "_armor_marked": True, "_armor_base": base, "__module__": base.__module__,
            "__reduce_ex__": _armored_reduce,
        })
    config.__class__ = _ARMORED[base]


def _register() -> None:
    # Guarded: a second import (importlib.reload, two armor copies) must not fail on "already registered".
    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, ArmorModelConfig)
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ArmorConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ArmorHfQuantizer)


_register()
