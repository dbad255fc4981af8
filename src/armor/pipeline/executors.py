"""Executors run layer jobs: in this process (:class:`LocalExecutor`) or on Ray (:mod:`armor.pipeline.ray_executor`).

The driver hands jobs over with ``submit`` and collects finished ones with ``results``; an executor decides only
where and when :func:`~armor.pipeline.jobs.run_layer_job` runs, never what it computes.
"""

from __future__ import annotations

from typing import Protocol

from .jobs import LayerJob, LayerOutcome, run_layer_job

__all__ = ["Executor", "LocalExecutor"]


class Executor(Protocol):
    """Runs layer jobs.  ``submit`` hands one over; ``results`` blocks until at most ``until_pending`` jobs are
    still running and returns every outcome finished since the last call, in completion order."""

    #: how many jobs the driver keeps in flight (bounds the memory of weights waiting to be pruned)
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

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
