"""The data flow around the per-layer solvers: one driver (:func:`prune`) for every model source, calibration
mode and executor.

* :mod:`armor.pipeline.driver` — :func:`prune`, the block-by-block loop (start reading here);
* :mod:`armor.pipeline.sources` — a model in memory, or a checkpoint read block by block;
* :mod:`armor.pipeline.jobs` — the one per-layer job body;
* :mod:`armor.pipeline.executors` / :mod:`armor.pipeline.ray_executor` — in process, or Ray (Ray is optional and
  imported only when a :class:`RayExecutor` is made);
* :mod:`armor.pipeline.evaluate` — perplexity of a saved model, whole or block by block.
"""

from __future__ import annotations

from .driver import CALIBRATION_MODES, PruneRun, PruneSettings, prune
from .executors import Executor, LocalExecutor
from .jobs import LayerJob, LayerOutcome, run_layer_job
from .ray_executor import RayExecutor
from .reconstruct import BlockReconstruction, ReconstructSettings
from .sources import CheckpointSource, InMemorySource

__all__ = [
    "prune",
    "PruneRun",
    "PruneSettings",
    "ReconstructSettings",
    "BlockReconstruction",
    "CALIBRATION_MODES",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "make_executor",
    "LayerJob",
    "LayerOutcome",
    "run_layer_job",
    "InMemorySource",
    "CheckpointSource",
]


def make_executor(
    workers: int | None = None, address: str | None = None, *, num_gpus: float = 0, max_retries: int = 3
) -> Executor:
    """A :class:`RayExecutor` when ``workers`` or ``address`` is given, else the in-process
    :class:`LocalExecutor`."""
    if not workers and not address:
        return LocalExecutor()
    return RayExecutor(workers, address, num_gpus=num_gpus, max_retries=max_retries)
