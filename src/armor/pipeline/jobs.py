"""The per-layer job: the one body that turns a dense layer into its packed pruned module, wherever it runs.

A :class:`LayerJob` is everything one layer's pruning needs (weight, bias, statistics, method, resolved options,
fingerprint).  :func:`run_layer_job` is idempotent: when ``<out>/layers/<name>.safetensors`` already holds a
valid result with the same fingerprint it is returned as is; otherwise the layer is pruned, checked in the dtype
it will be stored in, and written atomically.  In-process and Ray executors both run exactly this function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..runtime import empty_module_from_spec, module_from_result
from ..solvers import get_method, layer_proxy_loss, prune_layer
from ..stats import LayerStats
from ..storage.resume import LayerRecord, layer_file, load_layer_file, save_layer_file

__all__ = ["LayerJob", "LayerOutcome", "run_layer_job", "outcome_from_module"]


@dataclass
class LayerJob:
    """One layer to prune.  ``weight``/``bias``/``stats`` are ``None`` in the metadata copy shipped to Ray (the
    tensors travel separately through its object store).  ``options`` are already resolved by the registry."""

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
        mod = empty_module_from_spec(self.spec, dtype=getattr(torch, self.dtype), device=device)
        mod.load_state_dict(self.state, strict=True)
        return mod

    def layer_record(self) -> LayerRecord:
        rec = LayerRecord.from_json(self.record)
        rec.resumed = self.reused
        return rec

    def shippable(self) -> LayerOutcome:
        """A copy that crosses process boundaries: CPU tensors, no module object."""
        return dataclasses.replace(self, module_obj=None, state={k: v.cpu() for k, v in self.state.items()})


def outcome_from_module(name: str, module: nn.Module, rec: LayerRecord, reused: bool, written: bool) -> LayerOutcome:
    return LayerOutcome(
        name=name,
        spec=module.spec(),
        dtype=str(module.dtype).removeprefix("torch."),
        state={k: v.detach() for k, v in module.state_dict().items()},
        record=rec.to_json(),
        reused=reused,
        written=written,
        module_obj=module,
    )


def _stored_check(job: LayerJob, module: nn.Module, rec: LayerRecord) -> nn.Module:
    """Theorem 3.1 in the stored dtype: the loss of the factors AS STORED must not exceed NoWag-P's stored loss.

    Rounding the factors to float16/bfloat16 moves the loss; where it breaks the guarantee the layer falls back to
    NoWag-P (stored the same way), the better of the two.  The record keeps both stored losses.
    """
    assert job.weight is not None and job.stats is not None
    spec = get_method(job.method)
    # the check compares losses under the paper's diagonal objective; a solver with its own objective keeps its
    # guarantee under that one, which this check cannot judge
    if module.dtype == torch.float32 or not spec.wrappers or spec.objective != "diagonal":
        return module
    stored_loss = layer_proxy_loss(job.weight, job.stats, module.dense_weight())
    nowag = prune_layer(job.weight, job.stats, "nowag", n=job.n, m=job.m)
    nowag_module = module_from_result(nowag, module.bias, module.dtype, device=module.device)
    nowag_stored = layer_proxy_loss(job.weight, job.stats, nowag_module.dense_weight())
    check = {"dtype": str(module.dtype).removeprefix("torch."), "loss": stored_loss, "nowag_loss": nowag_stored}
    if stored_loss <= nowag_stored:
        rec.extra["stored_check"] = {**check, "kept": job.method}
        return module
    rec.extra["stored_check"] = {**check, "kept": "nowag"}
    rec.loss = nowag.loss
    return nowag_module


def run_layer_job(job: LayerJob) -> LayerOutcome:
    """Prune one layer (or restore it from a valid layer file); write the file atomically into ``out_dir``.

    Statistics rule (one for every method and executor): the job gets the statistics the registry's
    ``stats_kind`` asks for; a method that needs none still gets the diagonal, which weights its reported loss
    like every other method's.
    """
    if job.weight is None:
        raise ValueError(f"layer job {job.name}: no weight")
    path = layer_file(job.out_dir, job.name) if job.out_dir else None
    if path is not None and job.resume:
        got = load_layer_file(path, job.name, job.fingerprint, device=job.weight.device)
        if got is not None:  # a retried job whose first attempt finished the file before dying
            return outcome_from_module(job.name, got[0], got[1], reused=True, written=False)
    if job.stats is None and get_method(job.method).needs != "none":
        raise ValueError(f"no calibration statistics for layer {job.name}")
    result = prune_layer(job.weight, job.stats, job.method, n=job.n, m=job.m, **job.options)
    bias = None if job.bias is None else job.bias.detach()
    module = module_from_result(result, bias, job.weight.dtype, device=job.weight.device)
    rec = LayerRecord.from_result(job.name, result)
    del result
    if job.stats is not None:
        module = _stored_check(job, module, rec)
    if path is not None:
        save_layer_file(path, module, job.name, job.fingerprint, rec)
    return outcome_from_module(job.name, module, rec, reused=False, written=path is not None)
