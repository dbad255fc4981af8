"""The pruning baselines under ARMOR's interface: magnitude, Wanda, NoWag-P and SparseGPT (docs/algorithm.md §8).

Each takes the float32 weight ``(out, in)`` and :class:`~armor.stats.LayerStats` and returns the pruned weight and
its n:m mask in the original scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..factors import normalize_weight
from ..sparsity import nm_mask_from_scores
from ..stats import LayerStats

__all__ = ["magnitude", "wanda", "nowag_p", "nowag_scores", "sparsegpt"]


def magnitude(weight: Tensor, stats: LayerStats | None, n: int = 2, m: int = 4) -> tuple[Tensor, Tensor]:
    """Top-n of ``|W_ij|`` per group; needs no statistics."""
    mask = nm_mask_from_scores(weight.abs(), n, m)
    return weight * mask, mask


def wanda(weight: Tensor, stats: LayerStats, n: int = 2, m: int = 4) -> tuple[Tensor, Tensor]:
    """Top-n of ``|W_ij| * ||X_j||`` per group (Sun et al. 2023); no weight update.

    ``sqrt(h_j / 2) = sqrt(mean_t x_tj^2)``; the constant factor does not change the per-row ranking.
    """
    scores = weight.abs() * (stats.hessian_diag / 2).sqrt()
    mask = nm_mask_from_scores(scores, n, m)
    return weight * mask, mask


def nowag_scores(weight_normalized: Tensor, h: Tensor) -> Tensor:
    """NoWag-P's importance ``Wn_ij^2 * h_j`` (docs/algorithm.md §5)."""
    return weight_normalized.square() * h


def nowag_p(weight: Tensor, stats: LayerStats, n: int = 2, m: int = 4) -> tuple[Tensor, Tensor]:
    """Top-n of ``Wn_ij^2 h_j`` per group on the NoWag-normalised weight; kept values unchanged."""
    wn, _, _ = normalize_weight(weight)
    mask = nm_mask_from_scores(nowag_scores(wn, stats.hessian_diag), n, m)
    return weight * mask, mask


def sparsegpt(
    weight: Tensor,
    stats: LayerStats,
    n: int = 2,
    m: int = 4,
    column_batch: int = 128,
    damp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS mask choice and weight update with the full Hessian.

    Works column by column through the inverse Hessian's upper Cholesky factor; the n:m mask of each group of
    ``m`` columns is chosen when the sweep reaches the group, by ``w^2 / [H^-1]_jj^2`` on the updated weights.
    ``damp`` is the fraction of the mean diagonal added to the diagonal (1% as in the paper); ``column_batch``
    columns are updated together before their error is pushed to the rest (lazy batch updates, as in the paper).
    """
    if stats.hessian is None:
        raise ValueError(
            "sparsegpt needs the full input second-moment matrix: collect LayerStats with full=True "
            "(the pipeline does this for sparsegpt by itself)"
        )
    w = weight.to(torch.float64).clone()
    rows, cols = w.shape
    hess = stats.hessian.to(torch.float64).clone()
    dead = torch.diagonal(hess) <= 0
    hess[dead, dead] = 1.0
    w[:, dead] = 0.0
    hess.diagonal().add_(damp * torch.diagonal(hess).mean())
    # Upper Cholesky factor of H^-1: row j holds the OBS update direction for column j given columns < j done.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hess)), upper=True)

    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, column_batch):
        end = min(start + column_batch, cols)
        w_blk = w[:, start:end].clone()
        hinv_blk = hinv[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        for j in range(end - start):
            if j % m == 0:
                scores = w_blk[:, j : j + m].square() / torch.diagonal(hinv_blk)[j : j + m].square()
                mask[:, start + j : start + j + m] = nm_mask_from_scores(scores, n, m)
            d = hinv_blk[j, j]
            col = w_blk[:, j]
            q = torch.where(mask[:, start + j], col, torch.zeros_like(col))
            err = (col - q) / d
            w_blk[:, j:] -= err[:, None] * hinv_blk[j, j:][None, :]
            w_blk[:, j] = q
            err_blk[:, j] = err
        w[:, start:end] = w_blk
        w[:, end:] -= err_blk @ hinv[start:end, end:]
    w = (w * mask).to(torch.float32)
    return w, mask
