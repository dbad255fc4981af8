"""Pruning models that outgrow one machine.

* :mod:`armor.distributed.streaming`: calibration and pruning with one decoder block in memory at a time,
  weights read from the safetensors shards on demand (:func:`prune_streaming`), ``one-pass`` or
  ``sequential``.
* :mod:`armor.distributed.ray_backend`: per-layer jobs on Ray (:class:`RayExecutor`), retried when a worker
  dies.
* :mod:`armor.distributed.jobs`: the idempotent per-layer job and :func:`prune_model_parallel`, the
  whole-model loop with the layers handed to an executor.

Ray is optional and imported only when a :class:`RayExecutor` is made.
"""

from __future__ import annotations

from typing import Any

from .jobs import LayerJob, LayerOutcome, LocalExecutor, prune_model_parallel, run_layer_job
from .streaming import CALIBRATION_MODES, ActivationStore, ShardReader, prune_streaming, save_streamed_model

__all__ = [
    "CALIBRATION_MODES",
    "LayerJob",
    "LayerOutcome",
    "LocalExecutor",
    "RayExecutor",
    "ActivationStore",
    "ShardReader",
    "make_executor",
    "prune_model_parallel",
    "prune_streaming",
    "run_layer_job",
    "save_streamed_model",
]


def __getattr__(name: str) -> Any:
    if name == "RayExecutor":  # imported lazily: Ray is an optional dependency
        from .ray_backend import RayExecutor

        return RayExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_executor(
    workers: int | None = None, address: str | None = None, *, num_gpus: float = 0, max_retries: int = 3
) -> Any:
    """The executor for the command line's ``--workers N`` / ``--address ray://...``: a
    :class:`RayExecutor` when either is given, else the in-process :class:`LocalExecutor`."""
    if not workers and not address:
        return LocalExecutor()
    from .ray_backend import RayExecutor

    return RayExecutor(workers, address, num_gpus=num_gpus, max_retries=max_retries)
