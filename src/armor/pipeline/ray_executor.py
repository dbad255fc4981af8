"""Layer jobs on Ray: one task per layer, tensors through the object store, retried when a worker dies.

Ray does the scheduling (tasks ask for ``num_cpus``/``num_gpus``), the data movement (``ray.put``) and the
fault tolerance (``max_retries``: a task whose worker process died is run again elsewhere).  The driver only
keeps a bounded number of tasks in flight and collects them with ``ray.wait`` as they finish.

Ray is an optional dependency (``pip install 'armor-prune[distributed]'``); it is imported on first use.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from .jobs import LayerJob, LayerOutcome, keep_on_driver, run_layer_job

__all__ = ["RayExecutor", "import_ray", "init_ray"]


def import_ray() -> Any:
    """``import ray`` with an actionable error when it is not installed."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "distributed pruning (--workers/--address) needs Ray: pip install 'armor-prune[distributed]'"
        ) from None
    return ray


def init_ray(workers: int | None = None, address: str | None = None, **kwargs: Any) -> bool:
    """Start a local Ray with ``workers`` CPUs, or connect to the cluster at ``address`` (``ray://host:10001``
    or ``auto``).  Returns whether this call started Ray (and so should shut it down).

    The local cluster listens on the loopback interface only: it is a private worker pool, not a service.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, **_with_heap_settings(kwargs))
        except Exception as exc:  # Ray raises ConnectionError, TimeoutError or its own errors here
            raise ConnectionError(f"could not connect to the Ray cluster at {address}: {exc}") from None
        return True
    if workers is None or workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # Ray binds its servers to the machine's routable address unless "cluster mode" is off; off means a
    # local-only Ray bound to 127.0.0.1.  The variable is read by the child processes (from the environment)
    # and by the already-imported driver (from the constants module).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a Ray without the switch still works, just not loopback-only
        pass
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
             **kwargs)
    return True


def _with_heap_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``ray.init`` keyword arguments whose ``runtime_env`` also gives the cluster's workers this process's
    ``GLIBC_TUNABLES`` (armor's heap settings, :mod:`armor.heap`, or the user's): glibc reads them only when a process
    starts, and a cluster's nodes were started without them.  Local workers inherit the environment already.  The
    caller's own ``runtime_env`` entries win."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    if tunables is None:
        return kwargs
    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {"GLIBC_TUNABLES": tunables, **(runtime_env.get("env_vars") or {})}
    return {**kwargs, "runtime_env": runtime_env}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with the address in the message, when nothing listens there (Ray itself retries for minutes)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} must look like host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"could not connect to the Ray cluster at {address}: {exc}") from None


def _job_task(
    meta: LayerJob,
    weight: Any,
    bias: Any,
    stats: Any,
    threads: int,
    use_gpu: bool,
    hook: Callable[[str], None] | None,
) -> LayerOutcome:
    """Body of one Ray task (module-level so that workers import it rather than unpickle code)."""
    if hook is not None:  # test/fault-injection hook, run before any work
        hook(meta.name)
    # Use exactly the CPUs the task reserved: tasks must not oversubscribe the node (torch would take all).
    torch.set_num_threads(max(1, threads))
    if use_gpu and torch.cuda.is_available():
        weight = weight.cuda()
        bias = None if bias is None else bias.cuda()
        stats = None if stats is None else stats.to("cuda")
    # only the packed state goes back through the object store
    return run_layer_job(dataclasses.replace(meta, weight=weight, bias=bias, stats=stats)).shippable()


class RayExecutor:
    """Runs :class:`~armor.pipeline.jobs.LayerJob` s as Ray tasks.

    Args:
        workers: start a local Ray with this many CPUs (ignored when Ray is already initialised).
        address: connect to this cluster instead (``ray://head:10001`` or ``auto``).
        num_cpus, num_gpus: resources each layer task reserves (GPU tasks run the solver on the GPU).
        max_retries: how often a task is re-run after its worker died; a dead worker loses only its layer.
        window: layer tasks kept in flight (default: twice the cluster's slots for such tasks); bounds the
            weights waiting in the object store.
        hook: a picklable ``hook(layer_name)`` called in the worker at the start of every attempt (tests use
            it to kill a worker mid-run).
    """

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 3,
        window: int | None = None,
        hook: Callable[[str], None] | None = None,
    ) -> None:
        self.ray = import_ray()
        self._owns = init_ray(workers, address)
        self.num_gpus = num_gpus
        self.hook = hook
        self._task = self.ray.remote(_job_task).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False
        )
        self._threads = max(1, int(num_cpus))
        if window is None:
            res = self.ray.cluster_resources()
            slots = res.get("GPU", 0) / num_gpus if num_gpus else res.get("CPU", 1) / max(num_cpus, 1e-9)
            window = max(2, int(2 * slots))
        self.window = window
        self._refs: dict[Any, LayerJob] = {}  # in-flight task -> its job (no tensors)
        self._stats_refs: dict[int, tuple[Any, Any]] = {}  # id(stats) -> (stats, its object ref)

    def _put_stats(self, stats: Any) -> Any:
        # q/k/v (and gate/up) share one statistics object: ship it once.  The object itself is kept alive next
        # to its ref so that its id() cannot be reused by another object while the ref is cached.
        if stats is None:
            return None
        key = id(stats)
        if key not in self._stats_refs:
            if len(self._stats_refs) > 4 * self.window:  # old blocks' statistics are no longer needed
                self._stats_refs.clear()
            self._stats_refs[key] = (stats, self.ray.put(stats))
        return self._stats_refs[key][1]

    def submit(self, job: LayerJob) -> None:
        ray = self.ray
        bias_ref = None if job.bias is None else ray.put(job.bias.detach().cpu())
        stats = job.stats
        if stats is not None and stats.hessian_diag.device.type != "cpu":
            stats = stats.to("cpu")
        # Workers never write layer files: their disk need not be the driver's.  The driver writes each file it
        # receives (keep_on_driver), so resume and the streamed save find them wherever the workers ran.
        ref = self._task.remote(
            dataclasses.replace(job.meta(), out_dir=None), ray.put(job.weight.detach().cpu()), bias_ref,
            self._put_stats(stats), self._threads, self.num_gpus > 0, self.hook,
        )
        self._refs[ref] = job.meta()

    @property
    def pending(self) -> int:
        return len(self._refs)

    def results(self, until_pending: int = 0) -> list[LayerOutcome]:
        out: list[LayerOutcome] = []
        while self._refs:
            need = len(self._refs) - until_pending
            if need <= 0:  # collect what is already finished, without blocking
                ready, _ = self.ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
            else:
                ready, _ = self.ray.wait(list(self._refs), num_returns=need)
            for ref in ready:
                job = self._refs.pop(ref)
                try:
                    outcome = self.ray.get(ref)
                except self.ray.exceptions.RayError as exc:  # the job failed for good (retries used up)
                    raise RuntimeError(f"pruning layer {job.name} failed on Ray: {exc}") from exc
                out.append(keep_on_driver(outcome, job))
            if need <= 0 or len(self._refs) <= until_pending:
                break
        return out

    def close(self) -> None:
        for ref in list(self._refs):
            self.ray.cancel(ref, force=True)
        self._refs.clear()
        self._stats_refs.clear()
        if self._owns:
            self.ray.shutdown()
            self._owns = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
