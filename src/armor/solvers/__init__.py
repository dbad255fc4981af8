"""One entry point for every per-layer method: :func:`prune_layer`."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..factors import normalize_weight, proxy_loss
from ..result import PruneResult
from ..sparsity import check_nm_shape, nm_mask_from_scores
from ..stats import LayerStats, repair_hessian_diag
from . import baselines

__all__ = ["prune_layer", "METHODS", "METHOD_NEEDS"]

#: What each method needs from the calibration statistics.
METHOD_NEEDS: dict[str, str] = {
    "magnitude": "nothing",
    "wanda": "diagonal",
    "nowag": "diagonal",
    "sparsegpt": "full",
    "armor": "diagonal",
    "armor-fast": "diagonal",
}
METHODS = tuple(METHOD_NEEDS)


def _as_stats(stats: LayerStats | Tensor | None, in_features: int) -> LayerStats | None:
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
    method: str = "armor",
    *,
    n: int = 2,
    m: int = 4,
    **options: Any,
) -> PruneResult:
    """Prune one linear layer's weight ``(out_features, in_features)`` to n:m sparsity.

    Args:
        weight: the dense weight, any float dtype; all work is done in float32 on its device.
        stats: :class:`LayerStats`, or a ``(n,)`` Hessian diagonal, or a ``(n, n)`` Hessian.  ``magnitude``
            needs none, ``sparsegpt`` needs the full matrix, every other method the diagonal.
        method: one of :data:`METHODS`: ``"armor"`` (the paper's schedule, see
            :func:`armor.solvers.armor.armor_faithful`), ``"armor-fast"`` (exact block updates, see
            :func:`armor.solvers.armor_fast.armor_fast`), ``"nowag"``, ``"wanda"``, ``"magnitude"``,
            ``"sparsegpt"``.
        n, m: the pattern; 2:4 by default.
        **options: method options (ARMOR: ``block_size``, ``iterations``, ``seed``, ...; SparseGPT:
            ``block_size``, ``damp``).  Unknown options raise a TypeError.

    Returns:
        a :class:`PruneResult`; ``result.loss <= result.nowag_loss`` for the ARMOR methods.
    """
    if method not in METHOD_NEEDS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point torch.Tensor")
    check_nm_shape(weight.shape, n, m)
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} has non-finite entries")
    w = weight.detach().to(torch.float32)
    st = _as_stats(stats, w.shape[1])
    if st is None:
        if METHOD_NEEDS[method] != "nothing":
            raise ValueError(f"method {method!r} needs calibration statistics ({METHOD_NEEDS[method]} Hessian)")
        st = LayerStats(torch.ones(w.shape[1], device=w.device))
    h, n_repaired = repair_hessian_diag(st.hessian_diag.to(w.device))
    st = LayerStats(h, None if st.hessian is None else st.hessian.to(w.device), st.n_tokens)

    wn, r, c = normalize_weight(w)
    nowag_mask = nm_mask_from_scores(baselines.nowag_scores(wn, h), n, m)
    nowag_loss = float(proxy_loss(wn * nowag_mask, wn, h))

    start = time.perf_counter()
    if method in ("armor", "armor-fast"):
        if method == "armor":
            from .armor import armor_faithful as solve
        else:
            from .armor_fast import armor_fast as solve
        result = solve(wn, h, nowag_mask, r, c, n=n, m=m, **options)
        result.nowag_loss = nowag_loss
    else:
        fn = {
            "magnitude": baselines.magnitude,
            "wanda": baselines.wanda,
            "nowag": baselines.nowag_p,
            "sparsegpt": baselines.sparsegpt,
        }[method]
        pruned, mask = fn(w, st, n=n, m=m, **options)
        loss = float(proxy_loss(pruned / r[:, None] / c, wn, h))
        result = PruneResult(method, pruned, mask, loss, nowag_loss, n=n, m=m, history=[loss], raw_history=[loss])
    result.seconds = time.perf_counter() - start
    result.repaired_stats = n_repaired
    return result
