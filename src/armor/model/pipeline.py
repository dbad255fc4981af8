"""The whole model path in one call: select layers, calibrate (lazily), prune resumably, save.

Used by the command line and usable directly::

    ids = calibration_ids(tokenizer, docs, nsamples=32, seqlen=512)
    run = prune_pretrained(model, tokenizer, ids, "armor-fast", {"iterations": 200}, out_dir="out/armor-fast")
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..solvers import METHOD_NEEDS
from ..stats import LayerStats
from .calibration import calibration_sequences, collect_stats, tokenize_documents
from .io import read_armor_config, save_pruned
from .layers import find_prunable_layers
from .prune import LayerRecord, PruneRun, fingerprint, prune_model

__all__ = ["calibration_ids", "ids_digest", "StatsCache", "prune_pretrained", "finished_run"]


def calibration_ids(
    tokenizer: Any,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    name: str = "calibration text",
) -> torch.Tensor:
    """``(nsamples, seqlen)`` calibration token ids from documents (joined, tokenised once, cut)."""
    return calibration_sequences(tokenize_documents(tokenizer, documents, name=name), nsamples, seqlen, seed, name)


def ids_digest(ids: torch.Tensor) -> str:
    """Short hash of calibration token ids (part of every resume fingerprint)."""
    t = ids.detach().to(torch.int64).contiguous().cpu()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:24]


class StatsCache:
    """Calibration statistics collected at most once per layer and shared between methods.

    Statistics always come from the dense model; ``model`` must still be dense for every layer asked for (the
    pruning loop asks before it replaces anything).
    """

    def __init__(self, input_ids: torch.Tensor, batch_size: int = 8, full: bool = False, progress: bool = True):
        self.input_ids = input_ids
        self.batch_size = batch_size
        self.full = full
        self.progress = progress
        self.stats: dict[str, LayerStats] = {}
        self.passes = 0  # forward passes run (tests check that resumed runs skip calibration)

    def provider(self, model: nn.Module, layers: Mapping[str, nn.Linear]) -> Callable[[list[str]], dict]:
        def get(names: list[str]) -> dict[str, LayerStats]:
            missing = {n: layers[n] for n in names if n not in self.stats}
            if missing:
                self.passes += 1
                self.stats.update(
                    collect_stats(model, missing, self.input_ids, self.batch_size, self.full, progress=self.progress)
                )
            return {n: self.stats[n] for n in names}

        return get


def finished_run(out_dir: str | Path, settings_fp: str) -> dict[str, Any] | None:
    """The armor section of a saved model in ``out_dir`` made with the same settings, else ``None``."""
    try:
        section = read_armor_config(out_dir)
    except (OSError, ValueError):
        return None
    if section and section.get("fingerprint") == settings_fp:
        return section
    return None


def prune_pretrained(
    model: nn.Module,
    tokenizer: Any,
    calib_ids: torch.Tensor,
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    out_dir: str | Path | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    stats_cache: StatsCache | None = None,
    batch_size: int = 8,
    resume: bool = True,
    n: int = 2,
    m: int = 4,
    extra_config: Mapping[str, Any] | None = None,
    callback: Callable[[str, LayerRecord], None] | None = None,
    progress: bool = True,
    executor: Any = None,
) -> PruneRun:
    """Prune ``model`` in place with ``method`` and (when ``out_dir`` is given) save it there.

    ``executor`` runs the per-layer jobs elsewhere (e.g. :class:`armor.distributed.RayExecutor`); the layer
    files, records and results are the same as in process.

    ``out_dir`` also holds the resume state (``layers/``) and ``records.jsonl``.  ``extra_config`` is merged
    into the saved ``"armor"`` config section (e.g. calibration source, model path).
    """
    if method not in METHOD_NEEDS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NEEDS)}")
    options = dict(options or {})
    layers = find_prunable_layers(model, include, exclude, m=m)
    cache = stats_cache or StatsCache(calib_ids, batch_size, full=METHOD_NEEDS[method] == "full", progress=progress)
    if METHOD_NEEDS[method] == "full" and not cache.full:
        raise ValueError(f"method {method!r} needs full Hessians; build the StatsCache with full=True")
    calib_fp = ids_digest(calib_ids)
    prune_fn: Callable[..., PruneRun] = prune_model
    if executor is not None:
        from ..distributed.jobs import prune_model_parallel

        prune_fn = functools.partial(prune_model_parallel, executor=executor)
    run = prune_fn(
        model,
        layers,
        cache.provider(model, layers),
        method,
        options,
        n=n,
        m=m,
        out_dir=out_dir,
        resume=resume,
        run_fingerprint=calib_fp,
        callback=callback,
        progress=progress,
    )
    if out_dir is not None:
        section = armor_section(
            method, options, n, m, include, exclude, calib_ids, calib_fp, extra_config, run.records, run.seconds
        )
        save_pruned(model, tokenizer, out_dir, section)
    return run


def settings_fingerprint(
    model_id: str,
    method: str,
    options: Mapping[str, Any],
    calib_fp: str,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    n: int = 2,
    m: int = 4,
) -> str:
    """Hash of everything that determines a pruned model (used to skip work that is already done)."""
    return fingerprint(
        model=model_id,
        method=method,
        options=dict(options),
        calib=calib_fp,
        include=list(include or []),
        exclude=list(exclude or []),
        n=n,
        m=m,
    )


def armor_section(
    method: str,
    options: dict[str, Any],
    n: int,
    m: int,
    include: Any,
    exclude: Any,
    calib_ids: torch.Tensor,
    calib_fp: str,
    extra_config: dict[str, Any] | None,
    records: list[Any],
    seconds: float,
    **more: Any,
) -> dict[str, Any]:
    """The ``"armor"`` section of a saved model's ``config.json``: how it was made, and per-layer records."""
    k = max(len(records), 1)
    extra = dict(extra_config or {})
    calibration = {
        "nsamples": int(calib_ids.shape[0]),
        "seqlen": int(calib_ids.shape[1]),
        "digest": calib_fp,
        **more.pop("calibration", {}),
        **dict(extra.pop("calibration", {})),
    }
    return {
        "method": method,
        "options": options,
        "pattern": f"{n}:{m}",
        "include": list(include or []),
        "exclude": list(exclude or []),
        "calibration": calibration,
        **extra,
        **more,
        "mean_nowag_loss": sum(r.nowag_loss for r in records) / k,
        "mean_loss": sum(r.loss for r in records) / k,
        "prune_seconds": round(seconds, 2),
        "records": [r.to_json() for r in records],
    }
