"""Per-layer pruning jobs and the executors that run them (in process, or on Ray).

A :class:`LayerJob` is everything one layer's pruning needs: the dense weight, bias, statistics, method and
the resume fingerprint.  :func:`run_layer_job` is idempotent: when ``<out>/layers/<name>.safetensors`` already
holds a valid result with the same fingerprint it is returned as is; otherwise the layer is pruned and the
file is written atomically (the same format and fingerprint as :func:`armor.model.prune_model`, so the local,
streaming and distributed runs resume each other's files).  :func:`prune_model_parallel` is ``prune_model``
with the layers handed to an executor and collected as they complete.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..model.layers import set_module
from ..model.prune import (
    LayerRecord,
    PruneRun,
    layer_file,
    layer_fingerprint,
    load_layer_file,
    restore_finished,
    save_layer_file,
    stats_for_layer,
)
from ..solvers import METHOD_NEEDS, prune_layer
from ..stats import LayerStats

__all__ = [
    "LayerJob",
    "LayerOutcome",
    "Executor",
    "LocalExecutor",
    "run_layer_job",
    "layer_fingerprint",
    "prune_model_parallel",
    "ResultCollector",
]


@dataclass
class LayerJob:
    """One layer to prune.  ``weight``/``bias``/``stats`` are ``None`` in the metadata copy shipped to Ray
    (the tensors travel separately through the object store)."""

    name: str
    weight: Tensor | None
    bias: Tensor | None
    stats: LayerStats | None
    method: str
    options: dict[str, Any]
    fingerprint: str
    n: int = 2
    m: int = 4
    out_dir: str | None = None
    resume: bool = True

    def meta(self) -> LayerJob:
        """A copy without tensors."""
        return dataclasses.replace(self, weight=None, bias=None, stats=None)


@dataclass
class LayerOutcome:
    """A finished layer: its packed module state (enough to rebuild the module anywhere) and its record."""

    name: str
    spec: dict[str, Any]
    dtype: str
    state: dict[str, Tensor]
    record: dict[str, Any]
    reused: bool = False  # restored from an existing layer file instead of solved
    written: bool = False  # the job wrote the layer file itself
    module_obj: nn.Module | None = field(default=None, repr=False)  # set in process only (never shipped)

    def module(self, device: torch.device | str = "cpu") -> nn.Module:
        """The packed pruned module (the in-process object when there is one)."""
        if self.module_obj is not None:
            return self.module_obj.to(device)
        from ..runtime import empty_module_from_spec

        mod = empty_module_from_spec(self.spec, dtype=getattr(torch, self.dtype), device=device)
        mod.load_state_dict(self.state, strict=True)
        return mod

    def layer_record(self) -> LayerRecord:
        rec = LayerRecord.from_json(self.record)
        rec.resumed = self.reused
        return rec


def _outcome(name: str, module: nn.Module, rec: LayerRecord, reused: bool, written: bool) -> LayerOutcome:
    return LayerOutcome(
        name=name,
        spec=module.spec(),
        dtype=str(module.dtype).removeprefix("torch."),
        state={k: v.detach().cpu() for k, v in module.state_dict().items()},
        record=rec.to_json(),
        reused=reused,
        written=written,
        module_obj=module,
    )


def run_layer_job(job: LayerJob) -> LayerOutcome:
    """Prune one layer (or restore it from a valid layer file); write the file atomically into ``out_dir``.

    The solver call is the one :func:`armor.model.prune_model` makes (same arguments, dtype and device), so
    the result is identical to the single-process run's.
    """
    from ..runtime import module_from_result

    if job.weight is None:
        raise ValueError(f"layer job {job.name}: no weight")
    path = layer_file(job.out_dir, job.name) if job.out_dir else None
    if path is not None and job.resume:
        got = load_layer_file(path, job.name, job.fingerprint, device=job.weight.device)
        if got is not None:  # a retried job whose first attempt finished the file before dying
            return _outcome(job.name, got[0], got[1], reused=True, written=False)
    needs = METHOD_NEEDS[job.method]
    if needs != "nothing" and job.stats is None:
        raise ValueError(f"no calibration statistics for layer {job.name}")
    st = job.stats if needs != "nothing" else None
    result = prune_layer(job.weight, st, job.method, n=job.n, m=job.m, **job.options)
    bias = None if job.bias is None else job.bias.detach()
    module = module_from_result(result, bias, job.weight.dtype, device=job.weight.device)
    rec = LayerRecord.from_result(job.name, result)
    del result
    if path is not None:
        save_layer_file(path, module, job.name, job.fingerprint, rec)
    return _outcome(job.name, module, rec, reused=False, written=path is not None)


class Executor(Protocol):
    """Runs layer jobs.  ``submit`` hands one over; ``results`` blocks until at most ``until_pending`` jobs
    are still running and returns every outcome finished since the last call, in completion order."""

    #: how many jobs the driver keeps in flight (bounds the memory of weights waiting in the object store)
    window: int

    def submit(self, job: LayerJob) -> None: ...

    def results(self, until_pending: int = 0) -> list[LayerOutcome]: ...

    @property
    def pending(self) -> int: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs each job in this process as soon as it is submitted (the single-machine behaviour)."""

    window = 1

    def __init__(self) -> None:
        self._done: list[LayerOutcome] = []

    def submit(self, job: LayerJob) -> None:
        self._done.append(run_layer_job(job))

    def results(self, until_pending: int = 0) -> list[LayerOutcome]:
        out, self._done = self._done, []
        return out

    @property
    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass


class ResultCollector:
    """Driver side of a run: turns outcomes into modules, layer files, records, progress and callbacks.

    ``records.jsonl`` gets one line per finished layer as it arrives (restored layers included), so a watcher
    sees progress; :meth:`finish` rewrites it in layer order.
    """

    def __init__(
        self,
        names: list[str],
        method: str,
        out_dir: str | Path | None,
        fingerprints: Mapping[str, str] | None = None,
        callback: Callable[[str, LayerRecord], None] | None = None,
        progress: bool = True,
        append: bool = False,
    ) -> None:
        from tqdm.auto import tqdm

        self.names = list(names)
        self.out = Path(out_dir) if out_dir is not None else None
        self.fps = dict(fingerprints or {})
        self.callback = callback
        self.records: dict[str, LayerRecord] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.dtypes: dict[str, str] = {}
        self.records_path = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.records_path = self.out / "records.jsonl"
            if not append:
                self.records_path.write_text("")
        self.bar = tqdm(total=len(self.names), desc=f"prune {method}", unit="layer", disable=not progress)

    def add_fingerprints(self, fps: Mapping[str, str]) -> None:
        self.fps.update(fps)

    def accept(self, outcome: LayerOutcome, rec: LayerRecord | None = None) -> LayerRecord:
        """Record a finished layer (writing its file here when the worker could not, e.g. no shared disk)."""
        rec = rec or outcome.layer_record()
        name = outcome.name
        if self.out is not None and not outcome.reused:
            path = layer_file(self.out, name)
            if not path.is_file():
                save_layer_file(path, outcome.module(), name, self.fps[name], rec)
        if self.records_path is not None:
            with open(self.records_path, "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")
        self.records[name] = rec
        self.specs[name] = outcome.spec
        self.dtypes[name] = outcome.dtype
        self.bar.set_postfix(loss=f"{rec.loss:.4f}", nowag=f"{rec.nowag_loss:.4f}")
        self.bar.update(1)
        if self.callback is not None:
            self.callback(name, rec)
        return rec

    def finish(self) -> list[LayerRecord]:
        self.bar.close()
        missing = [n for n in self.names if n not in self.records]
        if missing:
            raise RuntimeError(f"{len(missing)} layers never finished, e.g. {missing[0]}")
        ordered = [self.records[n] for n in self.names]
        if self.records_path is not None:
            with open(self.records_path, "w") as f:
                for rec in ordered:
                    f.write(json.dumps(rec.to_json()) + "\n")
        return ordered

    def close(self) -> None:
        self.bar.close()


def prune_model_parallel(
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
    executor: Executor | None = None,
) -> PruneRun:
    """:func:`armor.model.prune_model` with the per-layer work run by ``executor`` (default: in process).

    Same arguments, same layer files, same records and the same modules in ``model``; layers finish in any
    order and are put in place as they arrive.
    """
    if method not in METHOD_NEEDS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NEEDS)}")
    executor = executor or LocalExecutor()
    options = dict(options or {})
    start = time.perf_counter()
    names = list(layers)
    fps = {nm: layer_fingerprint(layers[nm].weight, method, options, n, m, run_fingerprint) for nm in names}
    out = Path(out_dir) if out_dir is not None else None

    # Finished layers are restored by the driver itself, before any calibration, as prune_model does.
    done = {
        name: _outcome(name, module, rec, reused=True, written=False)
        for name, (module, rec) in restore_finished(layers, out, fps, resume).items()
    }
    todo = [n_ for n_ in names if n_ not in done]
    layer_stats = (dict(stats(todo)) if todo else {}) if callable(stats) else dict(stats)

    collector = ResultCollector(names, method, out, fps, callback, progress)

    def take(outcome: LayerOutcome) -> None:
        device = layers[outcome.name].weight.device
        set_module(model, outcome.name, outcome.module(device))
        collector.accept(outcome)

    try:
        for name in names:
            if name in done:
                take(done.pop(name))
        for name in todo:
            while executor.pending >= executor.window:
                for o in executor.results(until_pending=executor.window - 1):
                    take(o)
            lin = layers[name]
            st = stats_for_layer(layer_stats, name, method)
            executor.submit(LayerJob(
                name=name, weight=lin.weight.detach(), bias=None if lin.bias is None else lin.bias.detach(),
                stats=st, method=method, options=options, fingerprint=fps[name], n=n, m=m,
                out_dir=None if out is None else str(out), resume=resume,
            ))
            for o in executor.results(until_pending=executor.pending):  # whatever finished already
                take(o)
        for o in executor.results(until_pending=0):
            take(o)
        records = collector.finish()
    finally:
        collector.close()
    specs = {name: collector.specs[name] for name in names}
    resumed = sum(r.resumed for r in records)
    return PruneRun(method, options, records, specs, time.perf_counter() - start, resumed)
