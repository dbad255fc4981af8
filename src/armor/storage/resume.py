"""Resumable runs: per-layer result files, their records and the fingerprints that decide when one is reused.

Each finished layer is written to ``<out>/layers/<name>.safetensors`` (the packed inference module's state plus
JSON metadata) atomically, so a killed run restarts from its finished layers.  A layer file is reused only when its
metadata carries the same fingerprint (method, options, pattern, calibration data and mode, the dense weight
itself) and its tensors load into the module its spec describes; anything else is redone.  This module is the one
place where fingerprints are computed.
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
    "weight_digest",
    "ids_digest",
    "fingerprint",
    "layer_fingerprint",
    "layer_file",
    "save_layer_file",
    "load_layer_file",
    "peek_layer_file",
    "mean_losses",
]

log = logging.getLogger(__name__)

#: Version 2: records carry the block sizes actually used; statistics rules per method are fixed by the registry.
LAYER_FORMAT = "armor-layer-v2"
_OLD_LAYER_FORMATS = ("armor-layer-v1",)


def weight_digest(weight: Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype), so a layer file is never reused for a different weight."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    weight: Tensor, method: str, options: Mapping[str, Any], n: int, m: int, calibration: str
) -> str:
    """The resume fingerprint of one layer: method, options, pattern, calibration (data digest and mode) and the
    dense weight."""
    return fingerprint(
        method=method, options=dict(options), n=n, m=m, calibration=calibration, weight=weight_digest(weight)
    )


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
    meta = {
        "format": LAYER_FORMAT,
        "name": name,
        "fingerprint": fp,
        "spec": json.dumps(module.spec()),
        "dtype": str(module.dtype).removeprefix("torch."),
        "record": json.dumps(record.to_json()),
    }
    atomic_save_safetensors(module.state_dict(), path, meta)


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
        module = empty_module_from_spec(json.loads(meta["spec"]), dtype=getattr(torch, meta["dtype"]), device=device)
        module.load_state_dict(state, strict=True)
        record = LayerRecord.from_json(json.loads(meta["record"]))
    except Exception as exc:  # a damaged file is never trusted; it is simply redone
        log.warning("layer %s: ignoring unreadable %s (%s)", name, path, exc)
        return None
    record.resumed = True
    return module, record


def peek_layer_file(path: Path, name: str, fp: str) -> bool:
    """Whether ``path`` is a layer file of ``name`` with fingerprint ``fp`` (reads only its header)."""
    if not path.is_file():
        return False
    try:
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
    except Exception:  # damaged: not reusable
        return False
    return meta.get("format") == LAYER_FORMAT and meta.get("name") == name and meta.get("fingerprint") == fp
