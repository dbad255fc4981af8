"""Resumable runs: per-layer result files, their records and the fingerprints that decide when one is reused.

Each finished layer is written to ``<out>/layers/<name>.safetensors`` (the packed inference module's state plus
JSON metadata) atomically, so a killed run restarts from its finished layers.  A layer file is reused only when its
metadata carries the same fingerprint and its tensors are the ones it was written with (a digest of them is in its
metadata) and load into the module its spec describes; anything else is redone.

A layer's fingerprint covers everything its result depends on: method, options, pattern, calibration data and
mode, the dense weight itself, and its *context* (:class:`ModelDigests`): a chain of digests of the model's
tensors outside the decoder blocks (embeddings, norms, head) and of every block up to and including the layer's.
In one-pass mode that is what the layer's statistics are computed from; in sequential mode the earlier pruned
blocks follow from the same chain and settings.  This module is the one place where fingerprints are computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..result import PruneResult
from ..runtime import empty_module_from_spec
from .atomic import atomic_save_safetensors
from .checkpoint import open_safetensors

__all__ = [
    "LAYER_FORMAT",
    "LayerRecord",
    "refuse_non_finite",
    "weight_digest",
    "ids_digest",
    "fingerprint",
    "layer_fingerprint",
    "ModelDigests",
    "tensors_digest",
    "state_digest",
    "layer_file",
    "save_layer_file",
    "load_layer_file",
    "peek_layer_file",
    "mean_losses",
]

log = logging.getLogger(__name__)

#: Version 3: a digest of the file's tensors in its metadata, checked before reuse (v2: records carry the block
#: sizes actually used; statistics rules per method are fixed by the registry).
LAYER_FORMAT = "armor-layer-v3"
_OLD_LAYER_FORMATS = ("armor-layer-v1", "armor-layer-v2")


def weight_digest(weight: Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype), so a layer file is never reused for a different weight."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    if t.numel():  # through the buffer protocol: no copy of a large tensor
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def ids_digest(ids: Tensor) -> str:
    """Short hash of calibration token ids."""
    t = ids.detach().to(torch.int64).contiguous().cpu()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:24]


def fingerprint(**parts: Any) -> str:
    """Stable short hash of JSON-able settings."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def layer_fingerprint(
    weight: Tensor | str, method: str, options: Mapping[str, Any], n: int, m: int, calibration: str,
    context: str | None = None,
) -> str:
    """The resume fingerprint of one layer: method, options, pattern, calibration (data digest and mode), the
    dense weight (a tensor, or its :func:`weight_digest`) and the layer's context (``ModelDigests.chain`` of its
    block: every tensor its inputs depend on)."""
    digest = weight if isinstance(weight, str) else weight_digest(weight)
    parts: dict[str, Any] = dict(method=method, options=dict(options), n=n, m=m, calibration=calibration, weight=digest)
    if context is not None:
        parts["context"] = context
    return fingerprint(**parts)


def tensors_digest(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """:func:`weight_digest` of each tensor, by name."""
    return {key: weight_digest(t) for key, t in tensors.items()}


def refuse_non_finite(tensors: Mapping[str, Tensor]) -> None:
    """A ValueError naming the first floating-point tensor of ``tensors`` (a dense model's) that holds NaN or
    infinite values: every run digests each tensor it reads (:class:`ModelDigests`), so no model that computes NaN
    is pruned, and saved, as if it were sound."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"the model's tensor {key} holds {bad} NaN or infinite values of {t.numel()}: its checkpoint is "
                "damaged (or was saved after training diverged); armor prunes only a model with finite weights"
            )


#: config entries that do not change what the model computes (runtime switches, token ids, provenance); the
#: dtype is the run's own setting; entries starting with "_" are transformers' private state
_CONFIG_NOT_FORWARD = frozenset({
    "transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "armor",
})


def config_digest(config: Any) -> str:
    """A digest of the model config's entries (a ``PretrainedConfig``) that shape the forward (activation, norm
    epsilon, rotary scaling, attention windows, ...): a run resumes or reuses layers only for the config they were
    pruned under."""
    entries = config.to_dict()
    return fingerprint(**{k: v for k, v in entries.items() if not k.startswith("_") and k not in _CONFIG_NOT_FORWARD})


@dataclass
class ModelDigests:
    """Digests of a model's tensors, gathered one part at a time (the parts a source reads anyway).

    ``tensors`` maps each state-dict key to its :func:`weight_digest`; ``chain[i]`` digests the tensors outside
    the decoder blocks and those of blocks ``0..i`` (each link covers the previous one), so ``chain[-1]`` covers
    the whole model.  Tensors are digested in the run's dtype, so a model in memory and its checkpoint read
    block by block give the same digests.
    """

    tensors: dict[str, str] = field(default_factory=dict)
    chain: list[str] = field(default_factory=list)
    outer: str = ""

    def add_outer(self, tensors: Mapping[str, Tensor], config: Any) -> None:
        """The tensors outside the decoder blocks (embeddings, final norm, an untied head) and the model's
        ``config`` (:func:`config_digest`: what the forward computes with the tensors), first in the chain."""
        refuse_non_finite(tensors)
        digests = tensors_digest(tensors)
        self.tensors.update(digests)
        self.outer = fingerprint(outer=sorted(digests.items()), config=config_digest(config))

    def add_block(self, tensors: Mapping[str, Tensor]) -> None:
        """The next decoder block's tensors (blocks in order, after :meth:`add_outer`)."""
        refuse_non_finite(tensors)
        digests = tensors_digest(tensors)
        self.tensors.update(digests)
        previous = self.chain[-1] if self.chain else self.outer
        self.chain.append(fingerprint(previous=previous, block=sorted(digests.items())))

    @property
    def model(self) -> str:
        """The whole model's digest."""
        return self.chain[-1] if self.chain else self.outer


def state_digest(state: Mapping[str, Tensor]) -> str:
    """One digest of a module's state (a layer file's tensors), written into its metadata and checked on reuse."""
    return fingerprint(tensors=sorted(tensors_digest(state).items()))


@dataclass
class LayerRecord:
    """One line of ``records.jsonl``: how one layer was pruned."""

    name: str
    shape: list[int]
    method: str
    nowag_loss: float
    loss: float
    iterations: int
    seconds: float
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d

    @classmethod
    def from_result(cls, name: str, result: PruneResult) -> LayerRecord:
        s = result.summary()
        keep = (
            "stopped_early", "block_size_out", "block_size_in", "wrapper_overhead", "repaired_stats", "params",
            "stored_check",
        )
        return cls(
            name=name,
            shape=list(result.shape),
            method=result.method,
            nowag_loss=float(result.nowag_loss),
            loss=float(result.loss),
            iterations=int(result.iterations),
            seconds=round(float(result.seconds), 4),
            extra={k: s[k] for k in keep if k in s},
        )

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LayerRecord:
        base = {k: d[k] for k in ("name", "shape", "method", "nowag_loss", "loss", "iterations", "seconds")}
        extra = {k: v for k, v in d.items() if k not in base and k != "resumed"}
        return cls(**base, resumed=bool(d.get("resumed", False)), extra=extra)


def mean_losses(records: list[LayerRecord] | list[Mapping[str, Any]]) -> tuple[float, float]:
    """Mean NoWag-P loss and mean final loss over layer records (objects or their JSON)."""
    rows = [r.to_json() if isinstance(r, LayerRecord) else r for r in records]
    k = max(len(rows), 1)
    return sum(r["nowag_loss"] for r in rows) / k, sum(r["loss"] for r in rows) / k


def layer_file(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "layers" / f"{name}.safetensors"


def save_layer_file(path: Path, module: nn.Module, name: str, fp: str, record: LayerRecord) -> None:
    """Write one pruned layer's packed module state and metadata atomically."""
    state = module.state_dict()
    meta = {
        "format": LAYER_FORMAT,
        "name": name,
        "fingerprint": fp,
        "spec": json.dumps(module.spec()),
        "dtype": str(module.dtype).removeprefix("torch."),
        "record": json.dumps(record.to_json()),
        "content": state_digest(state),
    }
    atomic_save_safetensors(state, path, meta)


def load_layer_file(
    path: Path, name: str, fp: str, device: torch.device | str = "cpu"
) -> tuple[nn.Module, LayerRecord] | None:
    """The module and record saved at ``path``, or ``None`` when the file is missing, stale or damaged.

    A file of an older layout is not reused (its statistics rules differed); the log says so once per layer.
    """
    if not path.is_file():
        return None
    try:
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            if meta.get("format") in _OLD_LAYER_FORMATS:
                log.warning("layer %s: %s was written by an older armor (%s); pruning it again", name, path,
                            meta.get("format"))
                return None
            if meta.get("format") != LAYER_FORMAT or meta.get("name") != name:
                raise ValueError("not a layer file of this layer")
            if meta.get("fingerprint") != fp:
                log.info("layer %s: saved with other settings; pruning it again", name)
                return None
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
        if meta.get("content") != state_digest(state):
            log.warning("layer %s: the tensors in %s are not the ones it was written with; pruning it again",
                        name, path)
            return None
        module = empty_module_from_spec(json.loads(meta["spec"]), dtype=getattr(torch, meta["dtype"]), device=device)
        module.load_state_dict(state, strict=True)
        record = LayerRecord.from_json(json.loads(meta["record"]))
    except Exception as exc:  # a damaged file is never trusted; it is simply redone
        log.warning("layer %s: ignoring unreadable %s (%s)", name, path, exc)
        return None
    record.resumed = True
    return module, record


def peek_layer_file(path: Path, name: str, fp: str, verify: bool = False) -> bool:
    """Whether ``path`` is a layer file of ``name`` with fingerprint ``fp`` (reads only its header; with
    ``verify`` also its tensors, checked against the digest written with them)."""
    if not path.is_file():
        return False
    try:
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            if meta.get("format") != LAYER_FORMAT or meta.get("name") != name or meta.get("fingerprint") != fp:
                return False
            if not verify:
                return True
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    except Exception:  # damaged: not reusable
        return False
    if meta.get("content") != state_digest(state):
        log.warning("layer %s: the tensors in %s are not the ones it was written with; pruning it again", name, path)
        return False
    return True
