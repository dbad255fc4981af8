"""The pruning driver: one loop for every model source, calibration mode and executor.

:func:`prune` walks the decoder blocks in order.  For each block it

1. loads the block's weights (a no-op for a model in memory),
2. restores the block's layers that an earlier run finished (their layer files and fingerprints match),
3. runs the block over its calibration inputs with hooks that gather each remaining layer's statistics, and in
   ``one-pass`` mode (the paper's protocol) keeps the DENSE block's outputs as the next block's inputs,
4. hands the layers to the executor (in process, or Ray),
5. in ``sequential`` mode (SparseGPT's and Wanda's protocol) waits for them, puts them in place and computes the
   next block's inputs with the PRUNED block,
6. releases the block (a no-op in memory).

Then it saves the pruned model.  A model in memory (:class:`~armor.pipeline.sources.InMemorySource`) and a
checkpoint read block by block (:class:`~armor.pipeline.sources.CheckpointSource`) differ only in steps 1, 6 and
the save; the executor only decides where :func:`~armor.pipeline.jobs.run_layer_job` runs.  In one-pass mode the
per-layer results are bit-identical across all of these.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration import ActivationStore, StatsHooks, capture_block_inputs, run_block
from ..models import find_prunable_layers
from ..solvers import get_method
from ..storage import load_pruned, read_armor_config
from ..storage.atomic import write_text_atomic
from ..storage.resume import (
    LayerRecord,
    fingerprint,
    ids_digest,
    layer_file,
    layer_fingerprint,
    load_layer_file,
    mean_losses,
    peek_layer_file,
)
from .executors import Executor, LocalExecutor
from .jobs import LayerJob, LayerOutcome, outcome_from_module
from .sources import CheckpointSource, InMemorySource, ModelSource

__all__ = ["CALIBRATION_MODES", "PruneRun", "prune"]

#: ``one-pass``: every statistic from the dense model; ``sequential``: from the model pruned so far.
CALIBRATION_MODES = ("one-pass", "sequential")


@dataclass
class PruneRun:
    """What :func:`prune` did.  ``model`` is the pruned model when it is in memory (``None`` for a streamed run:
    load it from ``output`` with :func:`armor.load`)."""

    method: str
    options: dict[str, Any]
    records: list[LayerRecord]
    seconds: float
    mode: str = "one-pass"
    resumed: int = 0
    output: Path | None = None
    model: nn.Module | None = field(default=None, repr=False)
    run_info: dict[str, Any] = field(default_factory=dict, repr=False)
    already_done: bool = False  # the output folder already held this exact run; nothing was pruned

    def mean_losses(self) -> tuple[float, float]:
        """Mean NoWag-P loss and mean final loss over the layers."""
        return mean_losses(self.records)


class _Progress:
    """Records finished layers in arrival order (``records.jsonl`` grows as they finish) and shows a bar."""

    def __init__(self, names: list[str], method: str, out: Path | None, progress: bool,
                 callback: Callable[[str, LayerRecord], None] | None) -> None:
        self.names = names
        self.records: dict[str, LayerRecord] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.dtypes: dict[str, str] = {}
        self.callback = callback
        self.path = None if out is None else out / "records.jsonl"
        if self.path is not None:
            write_text_atomic("", self.path)
        self.bar = tqdm(total=len(names), desc=f"prune {method}", unit="layer", disable=not progress)

    def accept(self, outcome: LayerOutcome) -> None:
        rec = outcome.layer_record()
        self.records[outcome.name] = rec
        self.specs[outcome.name] = outcome.spec
        self.dtypes[outcome.name] = outcome.dtype
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")
        self.bar.set_postfix(loss=f"{rec.loss:.4f}", nowag=f"{rec.nowag_loss:.4f}")
        self.bar.update(1)
        if self.callback is not None:
            self.callback(outcome.name, rec)

    def finish(self) -> list[LayerRecord]:
        self.bar.close()
        missing = [n for n in self.names if n not in self.records]
        if missing:
            raise RuntimeError(f"{len(missing)} layers never finished, e.g. {missing[0]}")
        ordered = [self.records[n] for n in self.names]
        if self.path is not None:
            write_text_atomic("".join(json.dumps(r.to_json()) + "\n" for r in ordered), self.path)
        return ordered


def _check_calibration(calibration: Tensor) -> Tensor:
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        shape = tuple(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a non-empty (nsamples, seqlen) tensor of token ids, got {shape}")
    if calibration.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calibration must hold integer token ids, got dtype {calibration.dtype}")
    return calibration.long()


def run_fingerprint(layer_fps: Mapping[str, str], include: Sequence[str] | None, exclude: Sequence[str] | None) -> str:
    """Everything that determines a pruned model: every layer's fingerprint (method, options, pattern, calibration,
    weight) and the layer selection."""
    return fingerprint(layers=dict(layer_fps), include=list(include or []), exclude=list(exclude or []))


def prune(
    model: nn.Module | str | Path,
    calibration: Tensor,
    method: str = "armor-fast",
    *,
    options: Mapping[str, Any] | None = None,
    mode: str = "one-pass",
    executor: Executor | None = None,
    output: str | Path | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    n: int = 2,
    m: int = 4,
    resume: bool = True,
    keep_layer_files: bool = False,
    progress: bool = False,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    activation_budget: int = 2 << 30,
    offload_dir: str | Path | None = None,
    run_info: Mapping[str, Any] | None = None,
    callback: Callable[[str, LayerRecord], None] | None = None,
) -> PruneRun:
    """Prune every selected linear layer of the decoder blocks of ``model`` to n:m sparsity with ``method``.

    Args:
        model: a model in memory (pruned in place: each ``nn.Linear`` is replaced by its packed module), or the
            path of a Hugging Face folder with safetensors weights (streamed: one decoder block in memory at a
            time; ``output`` is required and receives the pruned model).
        calibration: ``(nsamples, seqlen)`` token ids (no padding), e.g. from :func:`armor.text.calibration_ids`.
        method, options: a registered method and its options (``armor.METHODS[method].options``).
        mode: ``"one-pass"`` (statistics of the dense model, the paper's protocol) or ``"sequential"``
            (statistics of the model pruned so far, as SparseGPT and Wanda publish).
        executor: where layer jobs run (default: this process; :class:`armor.pipeline.RayExecutor` for Ray).
        output: folder for the resume files (``layers/``, ``records.jsonl``) and the saved pruned model.  A run
            killed at any point resumes from its finished layers when started again with the same arguments.
        include, exclude: layer name patterns (see :func:`armor.models.name_matches`).
        keep_layer_files: keep ``output/layers/`` after the model is saved (default: removed).
        dtype, device: for a streamed checkpoint, the dtype its weights are pruned in (default float32) and where
            blocks run; a model in memory keeps its own.
        batch_size: calibration sequences per block forward.
        activation_budget: bytes of block inputs + outputs kept in memory; the rest goes to files in
            ``offload_dir`` (default ``<output>/.activations``, or a temporary folder), removed at the end.
        run_info: extra provenance stored with the saved model (calibration source, model path, ...).
        callback: ``callback(name, record)`` after each layer.
    """
    spec = get_method(method)
    resolved = spec.resolve(options)
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode must be one of {', '.join(CALIBRATION_MODES)}, got {mode!r}")
    calibration = _check_calibration(calibration)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    streamed = isinstance(model, (str, Path))
    if streamed and output is None:
        raise ValueError("pruning a checkpoint folder block by block needs an output folder for the result")
    source: ModelSource = (
        CheckpointSource(model, dtype, device or "cpu") if streamed else InMemorySource(model)  # type: ignore[arg-type]
    )
    sequential = mode == "sequential"
    start = time.perf_counter()
    out = Path(output) if output is not None else None

    layers = find_prunable_layers(source.model, include, exclude, m=m)
    names = list(layers)
    block_of = {name: int(name[len(source.prefix) + 1 :].split(".", 1)[0]) for name in names}
    calib_key = f"{ids_digest(calibration)}:{mode}"
    fps = {
        name: layer_fingerprint(source.layer_tensors(name)[0], method, resolved, n, m, calib_key) for name in names
    }
    run_fp = run_fingerprint(fps, include, exclude)

    if out is not None and resume:
        section = _finished_section(out, run_fp)
        if section is not None:
            records = [LayerRecord.from_json({**r, "resumed": True}) for r in section.get("records", [])]
            return PruneRun(
                method, resolved, records, 0.0, mode, len(records), out,
                None if streamed else load_pruned(out), section, already_done=True,
            )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").unlink(missing_ok=True)  # a half-updated folder must never look finished
        if not resume:
            shutil.rmtree(out / "layers", ignore_errors=True)
    done = {
        name for name in names
        if out is not None and resume and peek_layer_file(layer_file(out, name), name, fps[name])
    }
    todo = [name for name in names if name not in done]
    last = max((block_of[name] for name in todo), default=-1)

    executor = executor or LocalExecutor()
    tracker = _Progress(names, method, out, progress, callback)
    act_root = Path(offload_dir) if offload_dir is not None else (out / ".activations" if out else None)
    act_dir = (act_root or Path(os.environ.get("TMPDIR", "/tmp"))) / f"armor-act-{os.getpid()}-{time.time_ns()}"
    budget = activation_budget // 2  # inputs and outputs of one block are alive together
    inputs = ActivationStore(budget, act_dir)
    outputs: ActivationStore | None = None
    kinds = {name: spec.stats_kind for name in names}

    def take(outcome: LayerOutcome) -> None:
        tracker.accept(outcome)
        if not source.streamed:
            source.place(outcome.name, outcome.module(source.device))
        elif sequential:
            finished[outcome.name] = outcome

    def restore(name: str) -> LayerOutcome:
        got = load_layer_file(layer_file(out, name), name, fps[name], device=source.device)  # type: ignore[arg-type]
        if got is None:
            raise RuntimeError(f"layer file of {name} vanished or changed during the run; start it again")
        return outcome_from_module(name, got[0], got[1], reused=True, written=False)

    finished: dict[str, LayerOutcome] = {}
    try:
        if last >= 0:
            source.load_embeddings()
            calls = capture_block_inputs(
                source.model, source.blocks, last, calibration, batch_size, inputs, source.device, progress
            )
            source.release_embeddings()
        for i in range(len(source.blocks)):
            block_names = [name for name in names if block_of[name] == i]
            if i > last:  # nothing left to prune or calibrate: only finished layers to restore
                for name in block_names:
                    take(restore(name))
                continue
            block = source.load_block(i)
            block_todo = [name for name in block_names if name not in done]
            # Restored layers go in place only after the statistics pass: a block is calibrated dense.
            restored = [restore(name) for name in block_names if name in done]
            tracker.bar.set_description(f"prune {method} [block {i + 1}/{last + 1}]")
            hooks = StatsHooks({k: layers[k] for k in block_todo}, kinds) if block_todo else None
            want_out = i < last
            outputs = ActivationStore(budget, act_dir) if want_out else None
            if hooks is not None or (want_out and not sequential):
                # one-pass: the dense outputs come out of the statistics pass itself
                run_block(block, calls[i], inputs, None if sequential else outputs, source.device, hooks)
            stats = hooks.finish() if hooks is not None else {}
            for outcome in restored:
                take(outcome)
            for name in block_todo:
                while executor.pending >= executor.window:
                    for o in executor.results(until_pending=executor.window - 1):
                        take(o)
                # the block is loaded: its layer modules hold real weights whatever the source (no second read)
                lin = layers[name]
                weight, bias = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
                executor.submit(LayerJob(
                    name=name, weight=weight, bias=bias, stats=stats.get(name), method=method, options=resolved,
                    fingerprint=fps[name], n=n, m=m, out_dir=None if out is None else str(out), resume=resume,
                ))
                for o in executor.results(until_pending=executor.pending):
                    take(o)
            del stats
            if sequential and want_out:
                # The pruned block computes the next block's inputs: wait for its layers and put them in place.
                for o in executor.results(until_pending=0):
                    take(o)
                if source.streamed:
                    for name in block_names:
                        source.place(name, finished.pop(name).module(source.device))
                run_block(block, calls[i], inputs, outputs, source.device)
            finished.clear()
            source.release_block(i)
            inputs.close()
            if outputs is not None:
                inputs, outputs = outputs, None
        for o in executor.results(until_pending=0):
            take(o)
        records = tracker.finish()
    finally:
        tracker.bar.close()
        inputs.close()
        if outputs is not None:
            outputs.close()
        shutil.rmtree(act_dir, ignore_errors=True)
        if act_root is not None and offload_dir is None:
            try:
                act_root.rmdir()
            except OSError:
                pass
    seconds = time.perf_counter() - start
    nowag_mean, final_mean = mean_losses(records)
    info = {
        **dict(run_info or {}),
        "method": method,
        "options": resolved,
        "pattern": f"{n}:{m}",
        "include": list(include or []),
        "exclude": list(exclude or []),
        "calibration": {
            "nsamples": int(calibration.shape[0]),
            "seqlen": int(calibration.shape[1]),
            "digest": ids_digest(calibration),
            "mode": mode,
            **dict((run_info or {}).get("calibration", {})),
        },
        "streamed": source.streamed,
        "fingerprint": run_fp,
        "mean_nowag_loss": nowag_mean,
        "mean_loss": final_mean,
        "prune_seconds": round(seconds, 2),
        "records": [r.to_json() for r in records],
    }
    if out is not None:
        source.save(out, tracker.specs, tracker.dtypes, info, tokenizer)
        if not keep_layer_files:
            shutil.rmtree(out / "layers", ignore_errors=True)
    return PruneRun(
        method, resolved, records, seconds, mode, sum(r.resumed for r in records), out,
        None if source.streamed else source.model, info,
    )


def _finished_section(out: Path, run_fp: str) -> dict[str, Any] | None:
    """The saved run in ``out`` when it was made with exactly these settings, else ``None``."""
    try:
        section = read_armor_config(out)
    except (OSError, ValueError):
        return None
    if section and section.get("fingerprint") == run_fp:
        return section
    return None
