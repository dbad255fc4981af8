"""Prune every selected layer of a model, resumably.

Each finished layer is written to ``<out>/layers/<name>.safetensors`` (the packed inference module's state
plus JSON metadata) through a temporary file, fsync and rename, so a killed run restarts from its finished
layers.  A layer file is reused only when its metadata carries the same fingerprint (method, options, pattern,
calibration data, the dense weight itself) and its tensors load into the expected module; anything else is
redone.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..result import PruneResult
from ..solvers import METHOD_NEEDS, prune_layer
from ..stats import LayerStats
from .layers import set_module

__all__ = [
    "LayerRecord",
    "PruneRun",
    "prune_model",
    "method_options",
    "weight_digest",
    "fingerprint",
    "layer_file",
    "save_layer_file",
    "load_layer_file",
]

log = logging.getLogger(__name__)

LAYER_FORMAT = "armor-layer-v1"

#: Generic knob -> the solver parameter names it may map to (first one the solver accepts wins); armor-fast
#: counts its iterations in sweeps.
_KNOB_ALIASES: dict[str, tuple[str, ...]] = {"iterations": ("iterations", "sweeps")}


def _solver_parameters(method: str) -> set[str]:
    """Keyword parameters of the per-layer solver behind ``method`` (read from its signature)."""
    if method == "armor":
        from ..solvers.armor import armor_faithful as fn
    elif method == "armor-fast":
        from ..solvers.armor_fast import armor_fast as fn
    elif method == "sparsegpt":
        from ..solvers.baselines import sparsegpt as fn
    else:
        return set()
    return set(inspect.signature(fn).parameters) - {"n", "m", "callback"}


def method_options(method: str, **knobs: Any) -> dict[str, Any]:
    """Solver options of ``method`` from generic knobs (``iterations``, ``block_size``, ``seed``, ...).

    Knobs the method has no use for, and ``None`` values, are dropped, so one command line serves every
    method.
    """
    if method not in METHOD_NEEDS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NEEDS)}")
    params = _solver_parameters(method)
    out: dict[str, Any] = {}
    for knob, value in knobs.items():
        if value is None:
            continue
        for target in _KNOB_ALIASES.get(knob, (knob,)):
            if target in params:
                out[target] = value
                break
    return out


def weight_digest(weight: Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype), so a layer file is never reused for a different weight."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(**parts: Any) -> str:
    """Stable short hash of JSON-able settings."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class LayerRecord:
    """One line of ``records.jsonl``."""

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
        keep = ("stopped_early", "block_size_out", "block_size_in", "repaired_stats", "params")
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


def layer_file(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "layers" / f"{name}.safetensors"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform/filesystem; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_safetensors(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """``safetensors`` save through a temporary file, fsync and rename (never a half-written ``path``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """The module and record saved at ``path``, or ``None`` when the file is missing, stale or damaged."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    from ..runtime import empty_module_from_spec

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != LAYER_FORMAT or meta.get("name") != name:
                raise ValueError("not a layer file of this layer")
            if meta.get("fingerprint") != fp:
                log.info("layer %s: saved with other settings; pruning it again", name)
                return None
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
        dtype = getattr(torch, meta["dtype"])
        module = empty_module_from_spec(json.loads(meta["spec"]), dtype=dtype, device=device)
        module.load_state_dict(state, strict=True)
        record = LayerRecord.from_json(json.loads(meta["record"]))
    except Exception as exc:  # a damaged file is never trusted; it is simply redone
        log.warning("layer %s: ignoring unreadable %s (%s)", name, path, exc)
        return None
    record.resumed = True
    return module, record


@dataclass
class PruneRun:
    """What :func:`prune_model` did."""

    method: str
    options: dict[str, Any]
    records: list[LayerRecord]
    specs: dict[str, dict[str, Any]]
    seconds: float
    resumed: int = 0

    def mean_losses(self) -> tuple[float, float]:
        """Mean NoWag-P loss and mean final loss over the layers."""
        k = max(len(self.records), 1)
        return sum(r.nowag_loss for r in self.records) / k, sum(r.loss for r in self.records) / k



def layer_fingerprint(
    weight: Tensor, method: str, options: Mapping[str, Any], n: int, m: int, run_fingerprint: str
) -> str:
    """The resume fingerprint of one layer: method, options, pattern, run settings and the dense weight."""
    return fingerprint(
        method=method, options=dict(options), n=n, m=m, run=run_fingerprint, weight=weight_digest(weight)
    )


def restore_finished(
    layers: Mapping[str, nn.Linear], out: Path | None, fps: Mapping[str, str], resume: bool
) -> dict[str, tuple[nn.Module, LayerRecord]]:
    """Finished layers of an earlier run in ``out`` whose files are valid for ``fps``; without ``resume`` their
    files are deleted instead, so nothing stale is picked up later."""
    done: dict[str, tuple[nn.Module, LayerRecord]] = {}
    if out is None:
        return done
    for name in layers:
        path = layer_file(out, name)
        if not resume:
            path.unlink(missing_ok=True)
            continue
        got = load_layer_file(path, name, fps[name], device=layers[name].weight.device)
        if got is not None:
            done[name] = got
    return done


def stats_for_layer(layer_stats: Mapping[str, LayerStats | None], name: str, method: str) -> LayerStats | None:
    """The statistics a layer's solver gets; a clear error when a method that needs them has none.

    Statistics go to magnitude too: its mask ignores them, but its reported losses then use the same weighting
    as every other method's and stay comparable.
    """
    st = layer_stats.get(name)
    if st is None and METHOD_NEEDS[method] != "nothing":
        raise ValueError(f"no calibration statistics for layer {name}")
    return st

def prune_model(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    stats: Mapping[str, LayerStats | None] | Callable[[list[str]], Mapping[str, LayerStats | None]],
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    n: int = 2,
    m: int = 4,
    out_dir: str | Path | None = None,
    resume: bool = True,
    run_fingerprint: str = "",
    callback: Callable[[str, LayerRecord], None] | None = None,
    progress: bool = True,
) -> PruneRun:
    """Prune ``layers`` of ``model`` in place: each ``nn.Linear`` is replaced by its packed pruned module.

    Args:
        stats: per-layer statistics, or a function returning them for a list of layer names (called only for
            the layers not restored from ``out_dir``, so a resumed run skips calibration when all are done).
        options: method options passed to :func:`armor.prune_layer`.
        out_dir: where ``layers/`` and ``records.jsonl`` go; ``None`` keeps everything in memory (no resume).
        resume: reuse valid finished layer files in ``out_dir``.
        run_fingerprint: hash of the settings outside this call that change results (calibration data, ...).
        callback: called as ``callback(name, record)`` after each layer is done (and saved).
    """
    from tqdm.auto import tqdm

    from ..runtime import module_from_result

    options = dict(options or {})
    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    names = list(layers)
    fps = {name: layer_fingerprint(layers[name].weight, method, options, n, m, run_fingerprint) for name in names}
    done = restore_finished(layers, out, fps, resume)
    todo = [n_ for n_ in names if n_ not in done]
    owned = callable(stats)
    layer_stats = (dict(stats(todo)) if todo else {}) if callable(stats) else stats

    records_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        records_path = out / "records.jsonl"
        # Rewritten from scratch each run: restored layers first, new ones appended as they finish.
        with open(records_path, "w") as f:
            for name in names:
                if name in done:
                    f.write(json.dumps(done[name][1].to_json()) + "\n")

    records: dict[str, LayerRecord] = {}
    specs: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(names), desc=f"prune {method}", unit="layer", disable=not progress)
    try:
        for k, name in enumerate(names):
            lin = layers[name]
            if name in done:
                module, rec = done.pop(name)
            else:
                bar.set_description(f"prune {method} [{k + 1}/{len(names)}] {name}")
                st = stats_for_layer(layer_stats, name, method)
                result = prune_layer(lin.weight, st, method, n=n, m=m, **options)
                bias = None if lin.bias is None else lin.bias.detach()
                module = module_from_result(result, bias, lin.weight.dtype, device=lin.weight.device)
                rec = LayerRecord.from_result(name, result)
                del result
                if out is not None:
                    save_layer_file(layer_file(out, name), module, name, fps[name], rec)
                    with open(records_path, "a") as f:  # type: ignore[arg-type]
                        f.write(json.dumps(rec.to_json()) + "\n")
            set_module(model, name, module)
            records[name] = rec
            specs[name] = module.spec()
            if owned:
                layer_stats.pop(name, None)  # type: ignore[attr-defined]  # frees full Hessians early
            bar.set_postfix(loss=f"{rec.loss:.4f}", nowag=f"{rec.nowag_loss:.4f}")
            bar.update(1)
            if callback is not None:
                callback(name, rec)
    finally:
        bar.close()
    resumed = sum(r.resumed for r in records.values())
    return PruneRun(method, options, [records[n_] for n_ in names], specs, time.perf_counter() - start, resumed)
