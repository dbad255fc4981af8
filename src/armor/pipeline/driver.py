"""The pruning driver: one loop for every model source, calibration mode and executor.

:func:`prune` plans the run (which layers an earlier run finished), captures the first block's calibration inputs,
then walks the decoder blocks in order.  For each block that still has work (:meth:`_Run.process_block`) it

1. loads the block's weights (a no-op for a model in memory) and restores the layers an earlier run finished,
2. calibrates: runs the DENSE block over its statistics inputs with hooks that gather each remaining layer's
   statistics (``one-pass``: the dense model's activations, the paper's protocol; ``sequential``: the pruned
   model's, SparseGPT's and Wanda's protocol),
3. submits the layers to the executor (in process, or Ray) and hands finished ones over,
4. when the pruned block itself is needed (sequential statistics), waits for its layers and puts them in place,
5. advances the activation streams to the next block, and releases the block (a no-op in memory).

Then it records the run's provenance and saves the pruned model.  A model in memory
(:class:`~armor.pipeline.sources.InMemorySource`) and a checkpoint read block by block
(:class:`~armor.pipeline.sources.CheckpointSource`) differ only in loading, releasing and saving; the executor only
decides where :func:`~armor.pipeline.jobs.run_layer_job` runs.  In one-pass mode the per-layer results are
bit-identical across all of these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration import ActivationStore, BlockCalls, StatsHooks, capture_block_inputs, run_block
from ..factors import check_wrapper_budget
from ..models import check_token_ids, find_prunable_layers, get_module, position_limit
from ..runtime.packing import index_bits
from ..solvers import get_method, layer_proxy_loss
from ..stats import LayerStats
from ..storage import load_pruned, mark_pruned, read_armor_config
from ..storage.atomic import write_text_atomic
from ..storage.lock import FolderLock
from ..storage.resume import (
    LayerRecord,
    ModelDigests,
    fingerprint,
    ids_digest,
    layer_file,
    layer_fingerprint,
    load_layer_file,
    mean_losses,
    peek_layer_file,
    save_layer_file,
)
from ..storage.verify import weights_not_as_saved
from .executors import Executor, LocalExecutor
from .jobs import LayerJob, LayerOutcome, outcome_from_module
from .reconstruct import BlockReconstruction, ReconstructSettings, batch_rows, reconstruct_block, split_batches
from .sources import CheckpointSource, InMemorySource, ModelSource

log = logging.getLogger(__name__)

__all__ = ["CALIBRATION_MODES", "PruneRun", "PruneSettings", "prune"]

#: ``one-pass``: every statistic from the dense model; ``sequential``: from the model pruned so far.
CALIBRATION_MODES = ("one-pass", "sequential")


@dataclass
class PruneSettings:
    """How :func:`prune` runs: everything but the model, the calibration ids, the executor and the output folder.

    Attributes:
        method, options: a registered method and its options (``armor.METHODS[method].options``).
        mode: ``"one-pass"`` (statistics of the dense model, the paper's protocol) or ``"sequential"``
            (statistics of the model pruned so far, as SparseGPT and Wanda publish).
        n, m: the sparsity pattern (n kept in every group of m input columns).
        include, exclude: layer name patterns (see :func:`armor.models.name_matches`).
        resume: reuse finished layers of an earlier run in ``output`` (``False``: redo them all).
        keep_layer_files: keep ``output/layers/`` after the model is saved (default: removed).
        progress: show progress bars.
        dtype, device: for a streamed checkpoint, the dtype its weights are pruned and stored in (default: the
            dtype that stores most of its values, as transformers' ``dtype="auto"``) and where blocks run; a model
            in memory keeps its own.
        batch_size: calibration sequences per block forward.
        activation_budget: bytes of block activations kept in memory; the rest goes to files in ``offload_dir``
            (default ``<output>/.activations``, or a temporary folder), removed at the end.
        run_info: extra provenance stored with the saved model (calibration source, model path, ...).
        callback: ``callback(name, record)`` after each layer.
        reconstruct: tune each pruned block to reproduce the dense block's outputs
            (:mod:`armor.pipeline.reconstruct`); ``None``: off.
    """

    method: str = "armor-fast"
    options: Mapping[str, Any] | None = None
    mode: str = "one-pass"
    n: int = 2
    m: int = 4
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    resume: bool = True
    keep_layer_files: bool = False
    progress: bool = False
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    batch_size: int = 8
    activation_budget: int = 2 << 30
    offload_dir: str | Path | None = None
    run_info: Mapping[str, Any] | None = None
    callback: Callable[[str, LayerRecord], None] | None = None
    reconstruct: ReconstructSettings | None = None

    def check(self) -> None:
        """Raise a ValueError naming the first invalid setting."""
        if self.mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration mode must be one of {', '.join(CALIBRATION_MODES)}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"an n:m pattern needs integers 0 < n < m, got n={self.n!r}, m={self.m!r}")
        index_bits(self.m)  # the packed layers store group sizes 2..16: fail before anything is pruned
        for which in ("include", "exclude"):
            value = getattr(self, which)
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise TypeError(f"{which} must be a list of layer name patterns, got {value!r}"
                                + (f" (for one pattern: [{value!r}])" if isinstance(value, str) else ""))
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float16) or None, got {self.dtype!r}")
        if self.reconstruct is not None:
            if not isinstance(self.reconstruct, ReconstructSettings):
                raise TypeError(f"reconstruct must be a ReconstructSettings or None, got {self.reconstruct!r}")
            self.reconstruct.check()

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential"

    @property
    def needs_dense(self) -> bool:
        """The dense model's activations are carried: for one-pass statistics or as reconstruction targets."""
        return not self.sequential or self.reconstruct is not None

    @property
    def needs_pruned(self) -> bool:
        """The pruned model's activations are carried: for sequential statistics or as reconstruction inputs."""
        return self.sequential or self.reconstruct is not None


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

    def update(self, name: str, rec: LayerRecord) -> None:
        """A layer's record changed after it was accepted (a later line in ``records.jsonl`` supersedes)."""
        self.records[name] = rec
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")

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
        raise ValueError(f"calibration must hold token ids as int64 or int32, got dtype {calibration.dtype}")
    return calibration.long()


def run_fingerprint(layer_fps: Mapping[str, str], include: Sequence[str] | None, exclude: Sequence[str] | None,
                    model: str = "") -> str:
    """Everything that determines a pruned model: every layer's fingerprint (method, options, pattern, calibration,
    weight, context), the layer selection and the digest of the whole model (the tensors copied unpruned)."""
    return fingerprint(layers=dict(layer_fps), include=list(include or []), exclude=list(exclude or []), model=model)


class _Fingerprints:
    """The layers' fingerprints, from the model's digests (:class:`~armor.storage.resume.ModelDigests`).

    ``fps`` identify a layer's pruning (the layer job's files); ``final`` its final state, which with reconstruction
    also covers the reconstruction settings and every earlier block's (a chain), so a tuned layer is reused only
    after the very same tuning of everything before it.  In sequential mode ``fps`` also chain the earlier blocks'
    final layers (which were pruned, and how), since the statistics come from the model pruned so far.

    Filled all at once when an earlier run's files must be judged (:meth:`adopt`), else block by block from the
    tensors the walk loads anyway (:meth:`add_outer`, :meth:`add_block`): a fresh streamed run reads its checkpoint
    once.
    """

    def __init__(self, layers: Mapping[str, nn.Linear], block_of: Mapping[str, int], s: PruneSettings,
                 resolved: dict[str, Any], calib_key: str) -> None:
        self.layers, self.block_of, self.s, self.resolved, self.calib_key = layers, block_of, s, resolved, calib_key
        self.digests = ModelDigests()
        self.fps: dict[str, str] = {}
        self.final: dict[str, str] = {}
        self._recon = None if s.reconstruct is None else fingerprint(
            reconstruct=s.reconstruct.to_json(), batch_size=s.batch_size)
        # sequential statistics come from the model pruned so far: a chain over the earlier blocks' final layers
        self._earlier = fingerprint(pruned_before=[]) if s.sequential else None

    @property
    def blocks(self) -> int:
        """Blocks digested so far (always a prefix of the model's blocks)."""
        return len(self.digests.chain)

    def adopt(self, digests: ModelDigests) -> None:
        self.digests = digests
        for i in range(len(digests.chain)):
            self._block_fingerprints(i)

    def add_outer(self, tensors: Mapping[str, Tensor], config: Any) -> None:
        self.digests.add_outer(tensors, config)

    def add_block(self, tensors: Mapping[str, Tensor]) -> None:
        self.digests.add_block(tensors)
        self._block_fingerprints(self.blocks - 1)

    def _block_fingerprints(self, i: int) -> None:
        names = [name for name in self.layers if self.block_of[name] == i]
        s = self.s
        context = self.digests.chain[i]
        if self._earlier is not None:  # sequential: which layers of earlier blocks were pruned, and how
            context = fingerprint(dense=context, pruned_before=self._earlier)
        for name in names:
            self.fps[name] = layer_fingerprint(
                self.digests.tensors[f"{name}.weight"], s.method, self.resolved, s.n, s.m, self.calib_key,
                context=context,
            )
        if self._recon is None:
            self.final.update({name: self.fps[name] for name in names})
        elif names:
            self._recon = fingerprint(previous=self._recon, layers=[self.fps[name] for name in names])
            self.final.update({name: fingerprint(layer=self.fps[name], reconstructed=self._recon) for name in names})
        if self._earlier is not None and names:
            self._earlier = fingerprint(previous=self._earlier, layers={name: self.final[name] for name in names})

    def run_fp(self) -> str:
        return run_fingerprint(self.final, self.s.include, self.s.exclude, self.digests.model)


@dataclass
class _Plan:
    """Which layers the run prunes, their fingerprints, and how far an earlier run in ``out`` got.

    ``done``: final layer files exist; ``pruned``: pruned but not yet reconstructed.  ``lazy``: nothing in ``out``
    to reuse, so the fingerprints are filled as the walk loads the blocks.
    """

    layers: dict[str, nn.Linear]
    block_of: dict[str, int]
    fp: _Fingerprints
    done: set[str]
    pruned: set[str]
    lazy: bool = False

    @property
    def fps(self) -> dict[str, str]:
        return self.fp.fps

    @property
    def final_fps(self) -> dict[str, str]:
        return self.fp.final

    @property
    def run_fp(self) -> str:
        return self.fp.run_fp()

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def block_names(self, i: int) -> list[str]:
        return [name for name in self.layers if self.block_of[name] == i]

    @property
    def last(self) -> int:
        """The last block with work left (-1: none)."""
        return max((self.block_of[name] for name in self.layers if name not in self.done), default=-1)


def _block_label(prefix: str, i: int, dense: bool) -> str:
    """How a block is named in run_block's non-finite error."""
    return f"the {'dense' if dense else 'pruned'} model's block {prefix}.{i}"


def _has_results(out: Path) -> bool:
    """Whether ``out`` holds anything a run could reuse (a saved model or layer files)."""
    return (out / "config.json").is_file() or any((out / "layers").glob("*.safetensors"))


def _plan(source: ModelSource, calibration: Tensor, s: PruneSettings, resolved: dict[str, Any],
          out: Path | None) -> _Plan:
    layers = find_prunable_layers(source.model, s.include, s.exclude, m=s.m)
    block_of = {name: int(name[len(source.prefix) + 1 :].split(".", 1)[0]) for name in layers}
    fp = _Fingerprints(layers, block_of, s, resolved, f"{ids_digest(calibration)}:{s.mode}")
    if out is None or not s.resume or not _has_results(out):
        return _Plan(layers, block_of, fp, set(), set(), lazy=True)
    # Earlier results to judge: every tensor a layer's result depends on (its weight, and the chain over the
    # model's other tensors up to its block) is digested now, one part of the model in memory at a time.
    fp.adopt(source.digests())

    def on_disk(name: str, fingerprint: str) -> bool:  # the tensors too: a file whose content changed is redone
        return peek_layer_file(layer_file(out, name), name, fingerprint, verify=True)

    done = {name for name in layers if on_disk(name, fp.final[name])}
    pruned = {name for name in layers if s.reconstruct is not None and name not in done and on_disk(name, fp.fps[name])}
    return _Plan(layers, block_of, fp, done, pruned)


class _Stream:
    """One activation stream: the current block's inputs and the next block's, in memory up to a budget."""

    def __init__(self, budget: int, folder: Path) -> None:
        self.budget, self.folder = budget, folder
        self.inputs = ActivationStore(budget, folder)
        self.outputs: ActivationStore | None = None

    def open_outputs(self) -> ActivationStore:
        self.outputs = ActivationStore(self.budget, self.folder)
        return self.outputs

    def advance(self) -> None:
        """The outputs become the next block's inputs (no outputs: nothing is left to feed)."""
        self.inputs.close()
        if self.outputs is not None:
            self.inputs, self.outputs = self.outputs, None

    def close(self) -> None:
        self.inputs.close()
        if self.outputs is not None:
            self.outputs.close()


class _Streams:
    """The dense model's activations and the pruned model's, each carried only when the run needs it."""

    def __init__(self, s: PruneSettings, folder: Path) -> None:
        # inputs and outputs of each carried stream are alive together
        budget = s.activation_budget // (2 * (int(s.needs_dense) + int(s.needs_pruned)))
        self.folder = folder
        self.dense = _Stream(budget, folder) if s.needs_dense else None
        self.pruned = _Stream(budget, folder) if s.needs_pruned else None

    @property
    def first(self) -> ActivationStore:
        """Where the first block's inputs go (both streams start from the same embeddings)."""
        return (self.dense or self.pruned).inputs  # type: ignore[union-attr]

    def share_first(self) -> None:
        if self.dense is not None and self.pruned is not None:
            self.pruned.inputs = self.dense.inputs

    def advance(self) -> None:
        for stream in (self.dense, self.pruned):
            if stream is not None:
                stream.advance()

    def close(self) -> None:
        for stream in (self.dense, self.pruned):
            if stream is not None:
                stream.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _Run:
    """One pruning run's state; each method is one named step of :func:`prune`."""

    def __init__(self, source: ModelSource, s: PruneSettings, resolved: dict[str, Any], plan: _Plan,
                 executor: Executor, out: Path | None) -> None:
        self.source, self.s, self.resolved, self.plan = source, s, resolved, plan
        self.executor, self.out = executor, out
        self.tracker = _Progress(plan.names, s.method, out, s.progress, s.callback)
        self.kinds = {name: get_method(s.method).stats_kind for name in plan.names}
        self.finished: dict[str, LayerOutcome] = {}  # streamed: outcomes waiting to be placed in their block
        self.calls: list[BlockCalls] = []
        self.reconstructions: list[BlockReconstruction] = []

    # -- handing layers over ------------------------------------------------------------------------------
    def take(self, outcome: LayerOutcome) -> None:
        """Record a finished layer; in memory it goes in place at once (streamed: when its block is needed)."""
        self.tracker.accept(outcome)
        if not self.source.streamed:
            self.source.place(outcome.name, outcome.module(self.source.device))
        elif self.s.needs_pruned:
            self.finished[outcome.name] = outcome

    def restore(self, name: str) -> LayerOutcome:
        """A layer an earlier run finished (or pruned, before reconstruction), from its layer file."""
        fp = self.plan.final_fps[name] if name in self.plan.done else self.plan.fps[name]
        got = load_layer_file(layer_file(self.out, name), name, fp, device=self.source.device)  # type: ignore[arg-type]
        if got is None:
            raise RuntimeError(f"layer file of {name} vanished or changed during the run; start it again")
        return outcome_from_module(name, got[0], got[1], reused=True, written=False)

    def collect(self, until_pending: int) -> None:
        for outcome in self.executor.results(until_pending=until_pending):
            self.take(outcome)

    # -- the steps ---------------------------------------------------------------------------------------
    def capture(self, streams: _Streams, calibration: Tensor) -> None:
        """The first block's inputs and every block's call arguments, from the embeddings."""
        self.source.load_embeddings()
        if self.plan.lazy:
            self.plan.fp.add_outer(self.source.outer_tensors(), self.source.model.config)
        self.calls = capture_block_inputs(
            self.source.model, self.source.blocks, self.plan.last, calibration, self.s.batch_size, streams.first,
            self.source.device, self.s.progress,
        )
        self.source.release_embeddings()
        streams.share_first()

    def calibrate(self, i: int, block: nn.Module, todo: list[str], streams: _Streams,
                  recon: bool) -> dict[str, LayerStats]:
        """Statistics of the block's remaining layers, and the DENSE block's outputs where the run needs them."""
        hooks = StatsHooks({k: self.plan.layers[k] for k in todo}, self.kinds) if todo else None
        want = i < self.plan.last
        dense_out = streams.dense.open_outputs() if streams.dense is not None and (want or recon) else None
        if streams.pruned is not None and want:
            streams.pruned.open_outputs()
        stats_in = streams.pruned if self.s.sequential else streams.dense
        # one-pass: the dense outputs come out of the statistics pass itself
        one_pass_out = dense_out if stats_in is streams.dense else None
        if hooks is not None or one_pass_out is not None:
            run_block(block, self.calls[i], stats_in.inputs, one_pass_out, self.source.device, hooks,  # type: ignore[union-attr]
                      label=_block_label(self.source.prefix, i, stats_in is streams.dense))
        if dense_out is not None and one_pass_out is None:  # sequential statistics: the dense stream on its own
            run_block(block, self.calls[i], streams.dense.inputs, dense_out, self.source.device,  # type: ignore[union-attr]
                      label=_block_label(self.source.prefix, i, True))
        # a method that needs no statistics prunes a layer the forward never reached (an unrouted expert) anyway
        return hooks.finish(required=get_method(self.s.method).needs != "none") if hooks is not None else {}

    def submit(self, todo: list[str], stats: dict[str, LayerStats]) -> None:
        """Hand the block's remaining layers to the executor, keeping at most its window in flight."""
        out = None if self.out is None else str(self.out)
        for name in todo:
            while self.executor.pending >= self.executor.window:
                self.collect(self.executor.window - 1)
            # the block is loaded: its layer modules hold real weights whatever the source (no second read)
            lin = self.plan.layers[name]
            weight, bias = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
            self.executor.submit(LayerJob(
                name=name, weight=weight, bias=bias, stats=stats.get(name), method=self.s.method,
                options=self.resolved, fingerprint=self.plan.fps[name], n=self.s.n, m=self.s.m, out_dir=out,
                resume=self.s.resume,
            ))
            self.collect(self.executor.pending)

    def place_block(self, names: list[str]) -> None:
        """Wait for the block's layers and put them in place (in memory they already are)."""
        self.collect(0)
        if self.source.streamed:
            for name in names:
                self.source.place(name, self.finished.pop(name).module(self.source.device))

    def reconstruct(self, i: int, block: nn.Module, names: list[str], stats: dict[str, LayerStats],
                    streams: _Streams) -> None:
        """Tune the pruned block (its layers in place) to the dense block's outputs; record and store the layers."""
        assert self.s.reconstruct is not None and streams.dense is not None and streams.pruned is not None
        dense = {name: self.plan.layers[name].weight.detach() for name in names}
        rep = reconstruct_block(
            self.source.model, block, i, names, self.calls[i], streams.pruned.inputs, streams.dense.outputs,  # type: ignore[arg-type]
            self.s.reconstruct, self.source.device, dense,
        )
        self.reconstructions.append(rep)
        for name in names:
            module = get_module(self.source.model, name)
            rec = self.tracker.records[name]
            rec.extra["reconstruction"] = {"block": i, "kept": rep.kept, "error_before": rep.error_before,
                                           "error_after": rep.error_after, "output_error": rep.layer_errors[name]}
            if name in stats:  # the layer's own proxy loss after tuning (the solver's is ``loss``)
                weight = self.plan.layers[name].weight
                rec.extra["reconstruction"]["loss_after"] = layer_proxy_loss(weight, stats[name],
                                                                            module.dense_weight())
            self.tracker.update(name, rec)
            if self.out is not None:
                save_layer_file(layer_file(self.out, name), module, name, self.plan.final_fps[name], rec)

    def process_block(self, i: int, streams: _Streams) -> None:
        """Calibrate, prune, reconstruct and advance one block that has work left."""
        names = self.plan.block_names(i)
        block = self.source.load_block(i)
        if self.plan.lazy:  # the dense block as loaded: its fingerprints, before any layer is submitted
            self.plan.fp.add_block(self.source.block_tensors(i))
        todo = [name for name in names if name not in self.plan.done and name not in self.plan.pruned]
        recon = self.s.reconstruct is not None and any(name not in self.plan.done for name in names)
        # Restored layers go in place only after the dense passes: a block is calibrated dense.
        restored = [self.restore(name) for name in names if name not in todo]
        self.tracker.bar.set_description(f"prune {self.s.method} [block {i + 1}/{self.plan.last + 1}]")
        stats = self.calibrate(i, block, todo, streams, recon)
        for outcome in restored:
            self.take(outcome)
        self.submit(todo, stats)
        if streams.pruned is not None and (recon or i < self.plan.last):
            self.place_block(names)
        if recon:
            self.reconstruct(i, block, names, stats, streams)
        del stats
        if streams.pruned is not None and i < self.plan.last:
            # The pruned block computes the next block's inputs of the pruned model.
            run_block(block, self.calls[i], streams.pruned.inputs, streams.pruned.outputs, self.source.device,
                      label=_block_label(self.source.prefix, i, False))
        self.release(i, names)
        streams.advance()

    def release(self, i: int, names: list[str]) -> None:
        self.finished.clear()
        self.source.release_block(i)
        if self.source.streamed:  # the dense layers replaced in the block are still referenced by the plan
            for name in names:
                self.plan.layers[name].to("meta")

    def walk(self, calibration: Tensor, streams: _Streams) -> list[LayerRecord]:
        """Every block in order: those with work are processed, the rest only restored."""
        if self.plan.last >= 0:
            self.capture(streams, calibration)
        for i in range(len(self.source.blocks)):
            if i > self.plan.last:  # nothing left to prune or calibrate: only finished layers to restore
                for name in self.plan.block_names(i):
                    self.take(self.restore(name))
            else:
                self.process_block(i, streams)
        self.collect(0)
        while self.plan.lazy and self.plan.fp.blocks < len(self.source.blocks):  # blocks without selected layers
            self.plan.fp.add_block(self.source.read_block_tensors(self.plan.fp.blocks))
        return self.tracker.finish()


def _reconstruction_info(s: PruneSettings, run: _Run) -> dict[str, Any] | None:
    """The reconstruction settings and each block's errors (blocks restored from an earlier run: from their records)."""
    if s.reconstruct is None:
        return None
    blocks = {r.block: {k: v for k, v in r.to_json().items() if k != "layer_errors"} for r in run.reconstructions}
    for rec in run.tracker.records.values():
        info = rec.extra.get("reconstruction")
        if info is not None and info["block"] not in blocks:
            blocks[info["block"]] = {k: info[k] for k in ("block", "kept", "error_before", "error_after")}
    return {**s.reconstruct.to_json(), "batch_size": s.batch_size, "blocks": [blocks[b] for b in sorted(blocks)]}


def _provenance(s: PruneSettings, resolved: dict[str, Any], calibration: Tensor, plan: _Plan, streamed: bool,
                records: list[LayerRecord], seconds: float) -> dict[str, Any]:
    """What the saved model records about how it was made."""
    nowag_mean, final_mean = mean_losses(records)
    run_info = dict(s.run_info or {})
    return {
        **run_info,
        "method": s.method,
        "options": resolved,
        "pattern": f"{s.n}:{s.m}",
        "include": list(s.include or []),
        "exclude": list(s.exclude or []),
        "calibration": {
            "nsamples": int(calibration.shape[0]),
            "seqlen": int(calibration.shape[1]),
            "digest": ids_digest(calibration),
            "mode": s.mode,
            **dict(run_info.get("calibration", {})),
        },
        "streamed": streamed,
        "fingerprint": plan.run_fp,
        "mean_nowag_loss": nowag_mean,
        "mean_loss": final_mean,
        "prune_seconds": round(seconds, 2),
        "records": [r.to_json() for r in records],
    }


def _open_source(model: nn.Module | str | Path, s: PruneSettings, output: str | Path | None) -> ModelSource:
    if isinstance(model, (str, Path)):
        if output is None:
            raise ValueError("pruning a checkpoint folder block by block needs an output folder for the result")
        if read_armor_config(model) is not None:
            raise ValueError(f"{model} is already an armor-pruned model; prune the dense model it was made from")
        return CheckpointSource(model, s.dtype, s.device or "cpu")
    return InMemorySource(model)  # type: ignore[arg-type]


def _check_output(model: nn.Module | str | Path, output: str | Path | None) -> None:
    """Refuse an ``output`` folder that holds a model armor did not write (the dense checkpoint being pruned, or
    any other): the run would delete its ``config.json`` and replace its weights."""
    if output is None or not (Path(output) / "config.json").is_file():
        return
    try:
        pruned = read_armor_config(output) is not None
    except ValueError:  # a damaged armor section: not a folder this run may take over either
        pruned = False
    if pruned:
        return
    if isinstance(model, (str, Path)) and Path(model).resolve() == Path(output).resolve():
        raise ValueError(f"output {output} is the model being pruned; write the pruned model to another folder")
    raise ValueError(f"output {output} holds a model that is not armor-pruned (its config.json); the run would "
                     "replace it: choose another folder")


#: Where a run spills activations by default (under its output folder), and the name of each run's folder there.
_ACTIVATIONS, _ACT_PREFIX = ".activations", "armor-act-"


def _prepare_output(out: Path, resume: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # a half-updated folder must never look finished
    _remove_stale_activations(out)
    if not resume:
        _remove_layer_files(out)


def _remove_stale_activations(out: Path) -> None:
    """Remove the activation folders a killed run spilled into ``out/.activations`` (the folder lock says no
    other run is writing ``out``): they are never read again, and can be gigabytes."""
    root = out / _ACTIVATIONS
    if not root.is_dir():
        return
    for p in root.glob(f"{_ACT_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p)


def _remove_layer_files(out: Path) -> None:
    """Remove the layer files armor wrote in ``out/layers`` (and atomic writes a killed run left), then the folder
    when nothing else is in it: a file armor did not write is kept, with a warning naming it."""
    folder = out / "layers"
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file() and (p.suffix == ".safetensors" or (p.name.startswith(".") and p.suffix == ".tmp")):
            p.unlink(missing_ok=True)
    others = sorted(p.name for p in folder.iterdir())
    if others:
        log.warning("%s: kept, it holds files armor did not write: %s", folder, ", ".join(others[:5]))
    else:
        folder.rmdir()


def _activation_folder(s: PruneSettings, out: Path | None) -> tuple[Path, Path | None]:
    """A fresh folder for spilled activations, and the parent to remove afterwards when the driver made it."""
    root = Path(s.offload_dir) if s.offload_dir is not None else (out / _ACTIVATIONS if out else None)
    folder = (root or Path(os.environ.get("TMPDIR", "/tmp"))) / f"{_ACT_PREFIX}{os.getpid()}-{time.time_ns()}"
    return folder, root if s.offload_dir is None else None


def _already_done(source: ModelSource, s: PruneSettings, resolved: dict[str, Any], plan: _Plan,
                  out: Path | None) -> PruneRun | None:
    """The finished run in ``out`` when it was made with exactly these settings."""
    section = _finished_section(out, plan.run_fp) if out is not None and s.resume and not plan.lazy else None
    if section is None:
        return None
    records = [LayerRecord.from_json({**r, "resumed": True}) for r in section.get("records", [])]
    if not source.streamed:  # pruned in place, as promised: the saved layers go into the caller's model
        saved = load_pruned(out)
        for name in plan.layers:
            source.place(name, get_module(saved, name))
    model = None if source.streamed else mark_pruned(source.model, section)
    return PruneRun(s.method, resolved, records, 0.0, s.mode, len(records), out, model, section, already_done=True)


def prune(
    model: nn.Module | str | Path,
    calibration: Tensor,
    method: str = "armor-fast",
    *,
    executor: Executor | None = None,
    output: str | Path | None = None,
    tokenizer: Any = None,
    settings: PruneSettings | None = None,
    **kwargs: Any,
) -> PruneRun:
    """Prune every selected linear layer of the decoder blocks of ``model`` to n:m sparsity with ``method``.

    Args:
        model: a model in memory (pruned in place: each ``nn.Linear`` is replaced by its packed module), or the
            path of a Hugging Face folder with safetensors weights (streamed: one decoder block in memory at a
            time; ``output`` is required and receives the pruned model).
        calibration: ``(nsamples, seqlen)`` token ids (no padding), e.g. from :func:`armor.text.calibration_ids`.
        method: a registered method (``armor.METHODS``).
        executor: where layer jobs run (default: this process; :class:`armor.pipeline.RayExecutor` for Ray).
        output: folder for the resume files (``layers/``, ``records.jsonl``) and the saved pruned model.  A run
            killed at any point resumes from its finished layers when started again with the same arguments.
        tokenizer: saved next to the pruned model.
        settings, **kwargs: a :class:`PruneSettings`, or its fields as keywords (``options=``, ``mode=``,
            ``batch_size=``, ...); keywords override the fields of ``settings``.
    """
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(PruneSettings)})
    if unknown:
        raise TypeError(f"prune() got unknown settings {', '.join(unknown)}; see armor.PruneSettings")
    s = dataclasses.replace(settings or PruneSettings(), method=method, **kwargs)
    resolved = get_method(s.method).resolve(s.options)
    s.check()
    check_wrapper_budget(resolved, s.n, s.m)
    calibration = _check_calibration(calibration)
    _check_output(model, output)
    source = _open_source(model, s, output)
    try:
        check_token_ids(calibration, source.model, "calibration")
        limit = position_limit(source.model.config)
        if limit is not None and calibration.shape[1] > limit:
            raise ValueError(f"calibration sequences of {calibration.shape[1]} tokens are longer than the model's "
                             f"max_position_embeddings ({limit})")
        if s.reconstruct is not None:  # "auto" dtype and default steps settled before they are fingerprinted
            rows = batch_rows(len(calibration), s.batch_size)
            split_batches(rows, s.reconstruct.holdout)  # a holdout that leaves nothing to train on: refused now
            s = dataclasses.replace(s, reconstruct=s.reconstruct.for_run(source.device, len(rows)))
        out = Path(output) if output is not None else None
        # one writer per output folder: a second run into it fails at once (the lock dies with its process)
        with FolderLock(out) if out is not None else nullcontext():
            return _plan_run_save(source, s, resolved, calibration, executor or LocalExecutor(), out, tokenizer)
    except BaseException:
        source.undo_unpruned()  # a refused run leaves a model in memory as it was (its unfused experts restacked)
        raise


def _plan_run_save(source: ModelSource, s: PruneSettings, resolved: dict[str, Any], calibration: Tensor,
                   executor: Executor, out: Path | None, tokenizer: Any) -> PruneRun:
    """Plan the run, walk the blocks, record the provenance and save the model (``out`` is locked)."""
    start = time.perf_counter()
    plan = _plan(source, calibration, s, resolved, out)
    finished = _already_done(source, s, resolved, plan, out)
    if finished is not None:
        return finished
    if out is not None:
        _prepare_output(out, s.resume)
    act_dir, act_root = _activation_folder(s, out)
    streams = _Streams(s, act_dir)
    run = _Run(source, s, resolved, plan, executor, out)
    try:
        records = run.walk(calibration, streams)
    finally:
        run.tracker.bar.close()
        streams.close()
        if act_root is not None:
            try:
                act_root.rmdir()
            except OSError:
                pass
    seconds = time.perf_counter() - start
    info = _provenance(s, resolved, calibration, plan, source.streamed, records, seconds)
    recon = _reconstruction_info(s, run)
    if recon is not None:
        info["reconstruction"] = recon
    if out is not None:
        source.save(out, run.tracker.specs, run.tracker.dtypes, info, tokenizer)
        if not s.keep_layer_files:
            _remove_layer_files(out)
    return PruneRun(  # an in-memory model carries the pruned-folder markings: its save_pretrained writes one
        s.method, resolved, records, seconds, s.mode, sum(r.resumed for r in records), out,
        None if source.streamed else mark_pruned(source.model, info), info,
    )


def _finished_section(out: Path, run_fp: str) -> dict[str, Any] | None:
    """The saved run in ``out`` when it was made with exactly these settings, else ``None``."""
    try:
        section = read_armor_config(out)
    except (OSError, ValueError):
        return None
    if not section or section.get("fingerprint") != run_fp:
        return None
    changed = weights_not_as_saved(out)  # the settings match; the bytes must be the ones that run saved
    if changed is not None:
        log.warning("the finished model in %s was made with these settings, but it cannot be reused as saved (%s): "
                    "pruning it again", out, changed)
        return None
    return section
