"""Reading a Hugging Face checkpoint tensor by tensor, into a model skeleton that holds no weights.

A streamed run never loads the whole model: :func:`meta_skeleton` builds the architecture on the ``meta`` device
(no parameter memory), :class:`ShardReader` reads named tensors from the safetensors shard(s) on demand, and
:func:`materialise` / :func:`release` swap a sub-module's placeholders for real tensors and back.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import re
import sys
from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

__all__ = [
    "ShardReader", "CheckpointError", "meta_skeleton", "materialise", "release", "release_memory", "check_shapes",
    "check_covered", "raise_uncovered", "unexpected_keys",
    "untie_distinct_head", "check_head_alias", "tied_head_keys", "weight_files", "TensorStore",
]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated or corrupt weights (the message names the file)."""


#: safetensors' names of the floating-point dtypes, as the dtype a run computes and stores in
_STORED_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float32}


class TensorStore(Protocol):
    """What reads a checkpoint's tensors by key: :class:`ShardReader` (stored keys) or
    :class:`~armor.storage.conversion.CheckpointView` (the model's keys)."""

    folder: Path

    def __contains__(self, key: str) -> bool: ...

    def keys(self) -> list[str]: ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def load(
        self, keys: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]: ...


class ShardReader:
    """Tensors of a checkpoint folder, read on demand from its safetensors file(s).

    The files are the ones transformers' ``from_pretrained`` reads: ``model.safetensors`` when the folder has it,
    else the shards ``model.safetensors.index.json`` lists; so a streamed run prunes the model an in-memory run
    loads.  Each read opens the shard, copies the tensors out and closes it, so no memory map outlives the read
    and the process's resident memory only holds what was asked for.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = weight_files(self.folder, "model.safetensors")
        if files == [self.folder / "model.safetensors"] and (self.folder / "model.safetensors.index.json").is_file():
            log.warning("%s holds model.safetensors and a sharded model.safetensors.index.json: reading "
                        "model.safetensors, as transformers does", self.folder)
        missing = sorted(p.name for p in files if not p.is_file())
        if missing:
            raise CheckpointError(f"weights file(s) not found in {self.folder}: {', '.join(missing[:3])}"
                                  f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}, which "
                                  "model.safetensors.index.json lists")
        self.files: dict[str, Path] = {}
        for path in files:
            with open_safetensors(path) as f:
                self.files.update({k: path for k in f.keys()})  # noqa: SIM118 - safe_open has no iteration

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no tensor data is read)."""
        out: dict[str, tuple[int, ...]] = {}
        for path in dict.fromkeys(self.files.values()):
            with open_safetensors(path) as f:
                for k in f.keys():  # noqa: SIM118 - safe_open has no iteration
                    out[k] = tuple(f.get_slice(k).get_shape())
        return out

    def float_dtype(self) -> torch.dtype | None:
        """The floating-point dtype that holds most of the checkpoint's values, from the files' headers (float64
        read as float32, the widest the packed layers store); None when it holds no floating-point tensor."""
        counts: dict[torch.dtype, int] = {}
        for path in dict.fromkeys(self.files.values()):
            with open_safetensors(path) as f:
                for k in f.keys():  # noqa: SIM118 - safe_open has no iteration
                    part = f.get_slice(k)
                    dtype = _STORED_FLOATS.get(part.get_dtype())
                    if dtype is not None:
                        counts[dtype] = counts.get(dtype, 0) + math.prod(part.get_shape())
        return max(counts, key=counts.__getitem__) if counts else None

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def load(
        self, keys: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]:
        """The tensors ``keys``; floating-point ones cast to ``dtype`` (as ``from_pretrained(dtype=...)`` does)."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.files:
                raise KeyError(f"tensor {k!r} is not in the checkpoint {self.folder}")
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, Tensor] = {}
        for path, names in by_file.items():
            with open_safetensors(path) as f:
                for k in names:
                    try:
                        t = f.get_tensor(k)
                    except (SafetensorError, OSError, RuntimeError) as exc:
                        raise CheckpointError(
                            f"{path}: cannot read tensor {k!r} ({exc}); the file is damaged"
                        ) from None
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[k] = t.to(device)
        return out

    def load_row(self, key: str, index: int, dtype: torch.dtype | None = None) -> Tensor:
        """Row ``index`` of the stored tensor ``key`` (one expert of a stacked experts tensor), reading only it."""
        if key not in self.files:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.folder}")
        with open_safetensors(self.files[key]) as f:
            try:
                t = f.get_slice(key)[index]
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise CheckpointError(f"{self.files[key]}: cannot read tensor {key!r} ({exc}); the file is damaged"
                                      ) from None
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def weight_files(folder: Path, name: str) -> list[Path]:
    """The safetensors file(s) of a folder's weights, as transformers' ``from_pretrained`` picks them: ``name``
    when the folder has it, else the shards its index ``<name>.index.json`` lists (``save_pretrained(max_shard_size=
    ...)`` writes those).  A FileNotFoundError when it has neither; a CheckpointError for an index that cannot be
    read."""
    if (folder / name).is_file():
        return [folder / name]
    index = folder / f"{name}.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no {name} (nor a sharded {index.name}); re-save the model with "
                                "save_pretrained(..., safe_serialization=True)")
    try:
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
    return [folder / str(shard) for shard in shards]


class open_safetensors:  # noqa: N801 - used like the function it wraps
    """``safe_open`` with a :class:`CheckpointError` naming the file when it is truncated or corrupt."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Any:
        if not self.path.is_file():
            raise FileNotFoundError(f"weights file not found: {self.path}")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.__enter__()
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{self.path} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from None

    def __exit__(self, *exc: Any) -> None:
        self._handle.__exit__(*exc)


def meta_skeleton(model_path: str | Path, config: Any = None, strip_quantization: bool = False) -> nn.Module:
    """The model of ``model_path``'s config with every parameter on ``meta`` (buffers such as rotary tables are
    real: they are computed, not stored).  ``strip_quantization`` drops the config's quantisation section (a
    pruned folder's packed layers are put in place by the caller)."""
    if config is None:
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    if strip_quantization:
        for key in ("quantization_config", "armor"):
            if hasattr(config, key):
                delattr(config, key)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # on meta, from_config leaves tied parameters as separate placeholders
    return model.eval()


def tied_head_keys(model: nn.Module) -> tuple[str, str] | None:
    """``(embeddings key, head key)`` of a model whose config ties its output head to its input embeddings."""
    if not getattr(model.config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return None
    emb, head = _weight_key(model, model.get_input_embeddings()), _weight_key(model, model.get_output_embeddings())
    return None if emb is None or head is None else (emb, head)


def _weight_key(model: nn.Module, module: nn.Module | None) -> str | None:
    """The state-dict key of ``module``'s weight inside ``model`` (``None``: no such submodule)."""
    if module is None:
        return None
    return next((f"{name}.weight" for name, mod in model.named_modules() if name and mod is module), None)


def check_head_alias(model: nn.Module, aliases: Mapping[str, str], where: str | Path) -> None:
    """A CheckpointError when the weights store the output head only as an alias of the embeddings (a tied head,
    written once) while the model's config does not tie them: ``from_pretrained`` finds no head there and refuses,
    and an export would keep the untied config with no head, which plain transformers fills at random."""
    key = _weight_key(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    if key is not None and key in aliases and tied_head_keys(model) is None:
        raise CheckpointError(
            f"{where} stores {key} as {aliases[key]} (a tied head, written once), but config.json says "
            "tie_word_embeddings: false; set it to true there (from_pretrained refuses the folder as it is)"
        )


def untie_distinct_head(model: nn.Module, stored: TensorStore | Mapping[str, Tensor], where: str | Path) -> bool:
    """Untie the head of ``model`` when its config ties it to the embeddings but ``stored`` (a checkpoint, or a
    folder's tensors) holds both with different values, as ``from_pretrained`` does; the config then says
    ``tie_word_embeddings: false``, so the model is saved untied.  Returns whether it untied the head."""
    keys = tied_head_keys(model)
    if keys is None or not all(k in stored for k in keys):
        return False
    tensors = stored if isinstance(stored, Mapping) else stored.load(list(keys))
    embed, head = tensors[keys[0]], tensors[keys[1]]
    if embed.shape == head.shape and torch.equal(embed, head):
        return False
    log.warning("%s: config.json ties %s to %s, but the weights hold both with different values: they are loaded "
                "untied (as transformers does); set tie_word_embeddings to false there", where, *keys)
    model.config.tie_word_embeddings = False
    getattr(model, "all_tied_weights_keys", {}).pop(keys[1], None)  # transformers 5's record of the tie
    out = model.get_output_embeddings()
    if out.weight is model.get_input_embeddings().weight:  # a tied skeleton: the head gets its own placeholder
        out.weight = nn.Parameter(torch.empty_like(out.weight, device="meta"), out.weight.requires_grad)
    return True


def check_shapes(model: nn.Module, reader: TensorStore) -> None:
    """A CheckpointError listing every tensor whose shape in the checkpoint differs from the model's (a config
    that does not belong to these weights), before anything is loaded."""
    stored = reader.shapes()
    bad = [
        f"{k}: {tuple(t.shape)} in the model, {stored[k]} in the checkpoint"
        for k, t in model.state_dict(keep_vars=True).items()
        if k in stored and tuple(t.shape) != stored[k]
    ]
    if bad:
        more = f"\n(and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(
            f"config.json of {reader.folder} does not match its weights ({len(bad)} tensors differ in shape):\n"
            + "\n".join(bad[:5]) + more
        )


def check_covered(model: nn.Module, stored: Container[str], unused: Iterable[str], weights: str) -> None:
    """A CheckpointError naming the parameters of ``model`` (a skeleton) that ``stored`` (the keys the weights
    provide, under the model's names) lacks, which a loader would leave randomly initialised, and the ``unused``
    stored keys the model has no place for (:func:`unexpected_keys`); a head tied to the embeddings is not stored.
    ``weights`` names them in the message."""
    tied = tied_head_keys(model)
    missing = [k for k, _ in model.named_parameters(remove_duplicate=False)
               if k not in stored and not (tied and k == tied[1])]
    raise_uncovered(weights, missing, unexpected_keys(model, unused))


def raise_uncovered(weights: str, missing: Sequence[str], extra: Sequence[str]) -> None:
    """The CheckpointError, if any, for ``weights`` that lack the tensors ``missing`` or hold ``extra`` ones the
    model has no place for (five of each named)."""
    problems = []
    for keys, what in ((sorted(missing), "lack"), (sorted(extra), "hold tensors the model has no place for:")):
        if keys:
            more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{what} {', '.join(keys[:5])}{more}")
    if problems:
        raise CheckpointError(f"{weights} do not match its config.json: they {'; they '.join(problems)}")


def unexpected_keys(model: nn.Module, stored: Iterable[str]) -> list[str]:
    """The ``stored`` keys (a checkpoint's, that no tensor of ``model`` reads) that ``from_pretrained`` would report
    as unexpected: all but the model class's ``_keys_to_ignore_on_load_unexpected`` patterns and legacy buffers
    (per-layer rotary ``inv_freq``, ``position_ids``) of a model that now computes them."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    ignore = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    return sorted(k for k in stored if ignore is None or ignore.search(k) is None)


def _set_tensor(root: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer at dotted path ``name`` (e.g. a meta placeholder)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def materialise(
    root: nn.Module, prefix: str, reader: TensorStore, dtype: torch.dtype | None, device: Any,
    keys: Sequence[str] | None = None,
) -> list[str]:
    """Load ``root``'s state-dict entries (all, or ``keys``) from the checkpoint, where their full names are
    ``prefix + key``.  Buffers the checkpoint lacks but that are already real are kept.  Returns what was loaded."""
    state = root.state_dict(keep_vars=True)
    keys = list(state) if keys is None else list(keys)
    wanted = [k for k in keys if prefix + k in reader]
    missing = [k for k in keys if prefix + k not in reader and state[k].is_meta]
    if missing:
        raise KeyError(
            f"the checkpoint has no tensor for {prefix + missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ", under that name or one transformers' weight conversions load into it"
        )
    loaded = reader.load([prefix + k for k in wanted], dtype, device)
    for k in wanted:
        _set_tensor(root, k, loaded.pop(prefix + k))
    return wanted


def release(root: nn.Module, keys: Iterable[str]) -> None:
    """Put ``meta`` placeholders back in place of the entries ``keys`` of ``root`` (frees their memory)."""
    state = root.state_dict(keep_vars=True)
    for k in keys:
        _set_tensor(root, k, torch.empty_like(state[k], device="meta"))


def release_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc only; elsewhere a no-op).

    Block-by-block work frees a block's weights and activations and allocates the next block's of about the same
    sizes; glibc keeps such freed chunks in its arenas, so without a trim the resident size creeps up block after
    block although nothing is alive (benchmarks/RESULTS_memory.md).
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc: nothing to trim
        pass
