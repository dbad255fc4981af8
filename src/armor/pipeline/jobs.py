"""The per-layer job: the one body that turns a dense layer into its packed pruned module, wherever it runs.

A :class:`LayerJob` is everything one layer's pruning needs (weight, bias, statistics, method, resolved options,
fingerprint).  :func:`run_layer_job` is idempotent: when ``<out>/layers/<name>.safetensors`` already holds a
valid result with the same fingerprint it is returned as is; otherwise the layer is pruned, checked in the dtype
it will be stored in, and written atomically.  In-process and Ray executors both run exactly this function.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..runtime import empty_module_from_spec, module_from_result
from ..solvers import get_method, layer_proxy_loss, prune_layer
from ..stats import LayerStats
from ..storage.resume import LayerRecord, layer_file, load_layer_file, peek_layer_file, save_layer_file

__all__ = ["LayerJob", "LayerOutcome", "run_layer_job", "outcome_from_module", "keep_on_driver"]

log = logging.getLogger(__name__)


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


#: Hessian-diagonal entries a layer may have repaired (non-finite or non-positive) before it is a warning: a few
#: are dead input features; more say the layer's inputs overflowed or never reached it.
REPAIR_WARN_MIN = 4


def _warn_repaired(name: str, repaired: int, in_features: int) -> None:
    if repaired > max(REPAIR_WARN_MIN, in_features // 100):
        how = ("set to 1 (no valid entry is left: the layer is pruned as if every input feature weighed the same)"
               if repaired >= in_features else "replaced by the mean of the others")
        log.warning(
            "layer %s: %d of %d Hessian-diagonal entries were not finite or not positive and were %s; its "
            "calibration inputs overflowed or never reached it (check the model's weights)",
            name, repaired, in_features, how,
        )


def _non_finite(module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _finite_check(job: LayerJob, module: nn.Module, rec: LayerRecord) -> nn.Module:
    """Nothing non-finite is ever stored as a result: a solver output with a NaN/inf tensor or loss falls back to
    NoWag-P (no wrappers; the record says so under ``non_finite_fallback``) when that is finite, and is a
    ValueError naming the layer otherwise."""
    bad = _non_finite(module)
    if not bad and math.isfinite(rec.loss):
        return module
    what = ", ".join(bad) if bad else f"loss {rec.loss}"
    assert job.weight is not None
    if job.method != "nowag" and job.stats is not None:
        nowag = prune_layer(job.weight, job.stats, "nowag", n=job.n, m=job.m)
        fallback = module_from_result(nowag, module.bias, module.dtype, device=module.device)
        if not _non_finite(fallback) and math.isfinite(nowag.loss):
            log.warning("layer %s: %s produced non-finite %s; stored NoWag-P instead", job.name, job.method, what)
            kept = LayerRecord.from_result(job.name, nowag)  # no wrappers: its block sizes and params
            rec.extra = {**kept.extra, "non_finite_fallback": {"method": job.method, "tensors": bad, "kept": "nowag"}}
            rec.loss = float(nowag.loss)
            return fallback
    raise ValueError(
        f"layer {job.name}: {job.method} produced non-finite {what} (and no finite fallback); the layer's weight "
        "or calibration inputs hold values too large for float32"
    )


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
    try:
        result = prune_layer(job.weight, job.stats, job.method, n=job.n, m=job.m, **job.options)
    except (ValueError, RuntimeError) as exc:  # a solver's message does not know which layer it is about
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        raise kind(f"layer {job.name} ({job.method}): {exc}") from exc
    _warn_repaired(job.name, result.repaired_stats, job.weight.shape[1])
    bias = None if job.bias is None else job.bias.detach()
    module = module_from_result(result, bias, job.weight.dtype, device=job.weight.device)
    rec = LayerRecord.from_result(job.name, result)
    del result
    if job.stats is not None:
        module = _stored_check(job, module, rec)
    else:  # a layer the calibration forward never reached (an unrouted expert): its losses are unweighted
        rec.extra["no_calibration_tokens"] = True
    module = _finite_check(job, module, rec)
    if path is not None:
        save_layer_file(path, module, job.name, job.fingerprint, rec)
    return outcome_from_module(job.name, module, rec, reused=False, written=path is not None)


def keep_on_driver(outcome: LayerOutcome, job: LayerJob) -> LayerOutcome:
    """Make sure the layer file of ``outcome`` is in ``job.out_dir`` as the driver sees it, writing it from the
    received state when it is not (a worker whose disk is not the driver's).  Returns the outcome marked
    ``written``.  Without an ``out_dir`` (no resume files) the outcome is returned as is."""
    if not job.out_dir:
        return outcome
    path = layer_file(job.out_dir, job.name)
    if not peek_layer_file(path, job.name, job.fingerprint):
        rec = LayerRecord.from_json(outcome.record)
        rec.resumed = False
        save_layer_file(path, outcome.module(), job.name, job.fingerprint, rec)
    return dataclasses.replace(outcome, written=True)
