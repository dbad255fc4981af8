"""Per-layer pruning: :func:`prune_layer` runs any registered method (:mod:`armor.solvers.registry`) on one weight.

Where the maths lives: ARMOR itself in :mod:`armor.solvers.armor` (the problem, the exact sparse-core step, the
paper's schedule), the fast solver in :mod:`armor.solvers.armor_fast`, the baselines in
:mod:`armor.solvers.baselines`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..factors import normalize_weight, proxy_loss
from ..result import PruneResult
from ..sparsity import check_nm_shape, nm_mask_from_scores
from ..stats import LayerStats, repair_hessian_diag
from . import baselines
from .registry import METHODS, Method, Option, get_method

__all__ = [
    "prune_layer",
    "layer_proxy_loss",
    "as_stats",
    "METHODS",
    "Method",
    "Option",
    "get_method",
]


def as_stats(stats: LayerStats | Tensor | None, in_features: int) -> LayerStats | None:
    """``stats`` as :class:`LayerStats`: a ``(n,)`` tensor is the Hessian diagonal, ``(n, n)`` the full Hessian."""
    if stats is None or isinstance(stats, LayerStats):
        out = stats
    elif isinstance(stats, Tensor):
        out = LayerStats(stats) if stats.dim() == 1 else LayerStats(torch.diagonal(stats).clone(), stats)
    else:
        raise TypeError(f"stats must be LayerStats, a (n,) Hessian diagonal or a (n, n) Hessian, got {type(stats)}")
    if out is not None and out.in_features != in_features:
        raise ValueError(
            f"statistics are for {out.in_features} input features but the weight has {in_features} "
            "(weight must be (out_features, in_features))"
        )
    return out


def prune_layer(
    weight: Tensor,
    stats: LayerStats | Tensor | None = None,
    method: str = "armor-fast",
    *,
    n: int = 2,
    m: int = 4,
    callback: Callable[[int, float], None] | None = None,
    **options: Any,
) -> PruneResult:
    """Prune one linear layer's weight ``(out_features, in_features)`` to n:m sparsity.

    Args:
        weight: the dense weight, any float dtype; all work is done in float32 on its device.
        stats: :class:`LayerStats`, or a ``(n,)`` Hessian diagonal, or a ``(n, n)`` Hessian.  ``magnitude``
            needs none (with statistics its reported losses are weighted like every other method's),
            ``sparsegpt`` needs the full matrix, every other method the diagonal.
        method: a name in :data:`METHODS` (``armor.METHODS[name].summary`` says what it does).
        n, m: the pattern; 2:4 by default.
        callback: ``callback(step, best_loss)`` after every iteration (``armor``) or sweep (``armor-fast``,
            ``armor-bh``), for progress and loss-vs-time traces; a method without iterations refuses it.
        **options: the method's options (``armor.METHODS[name].options``); an option the method does not take
            is a TypeError naming the ones it does.

    Returns:
        a :class:`PruneResult`; ``result.loss <= result.nowag_loss`` for the ARMOR methods.
    """
    spec: Method = get_method(method)
    resolved = spec.resolve(options)
    if callback is not None:
        if not spec.wrappers:
            raise TypeError(f"method {method!r} has no iterations to report: callback is for the ARMOR methods")
        resolved["callback"] = callback
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point torch.Tensor")
    check_nm_shape(weight.shape, n, m)
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} has non-finite entries")
    w = weight.detach().to(torch.float32)
    st = as_stats(stats, w.shape[1])
    if st is None:
        if spec.needs != "none":
            raise ValueError(f"method {method!r} needs calibration statistics ({spec.needs} Hessian)")
        st = LayerStats(torch.ones(w.shape[1], device=w.device))
    if spec.needs == "full" and st.hessian is None:
        raise ValueError(
            f"method {method!r} needs the full input second-moment matrix: collect LayerStats with full=True"
        )
    h, n_repaired = repair_hessian_diag(st.hessian_diag.to(w.device))
    st = LayerStats(h, None if st.hessian is None else st.hessian.to(w.device), st.n_tokens)

    wn, r, c = normalize_weight(w)
    nowag_mask = nm_mask_from_scores(baselines.nowag_scores(wn, h), n, m)
    nowag_loss = float(proxy_loss(wn * nowag_mask, wn, h))

    start = time.perf_counter()
    if spec.wrappers and spec.objective == "diagonal":
        result = spec.solve(wn, h, nowag_mask, r, c, n=n, m=m, **resolved)
        result.nowag_loss = nowag_loss
    elif spec.wrappers:  # its own objective: the solver reports NoWag-P's loss under it too
        result = spec.solve(wn, h, nowag_mask, r, c, hessian=st.hessian, n=n, m=m, **resolved)
    else:
        pruned, mask = spec.solve(w, st, n=n, m=m, **resolved)
        loss = float(proxy_loss(pruned / r[:, None] / c, wn, h))
        result = PruneResult(method, pruned, mask, loss, nowag_loss, n=n, m=m, history=[loss], raw_history=[loss])
    result.seconds = time.perf_counter() - start
    result.repaired_stats = n_repaired
    return result


def layer_proxy_loss(weight: Tensor, stats: LayerStats | Tensor, w_hat: Tensor) -> float:
    """The proxy loss (docs/algorithm.md §3) of a reconstruction ``w_hat`` of ``weight``, in the normalised scale
    the solvers use, whatever dtype ``w_hat`` was stored in (it is compared in float32)."""
    w = weight.detach().to(torch.float32)
    st = as_stats(stats, w.shape[1])
    h, _ = repair_hessian_diag(st.hessian_diag.to(w.device))
    wn, r, c = normalize_weight(w)
    return float(proxy_loss(w_hat.to(device=w.device, dtype=torch.float32) / r[:, None] / c, wn, h))
