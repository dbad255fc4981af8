"""N:M semi-structured sparsity helpers (2:4 by default), pure tensor code.

A pattern ``n:m`` keeps exactly ``n`` entries in every group of ``m`` consecutive entries along the input
dimension (the last axis of a ``(out, in)`` weight).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["check_nm_shape", "nm_mask_from_scores", "is_nm_mask", "nm_supports"]


def check_nm_shape(shape: tuple[int, ...] | torch.Size, n: int = 2, m: int = 4) -> None:
    """Raise a ValueError naming the shape when a weight cannot carry an n:m pattern."""
    if not (0 < n < m):
        raise ValueError(f"an n:m pattern needs 0 < n < m, got {n}:{m}")
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(shape)}")
    if shape[1] % m != 0:
        raise ValueError(
            f"weight of shape {tuple(shape)}: in_features={shape[1]} is not a multiple of {m}, "
            f"so it cannot be pruned to {n}:{m} sparsity"
        )


def nm_mask_from_scores(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Boolean mask keeping the ``n`` largest scores of every group of ``m`` along the last axis.

    Ties are broken deterministically towards the lower index (quantised weights tie often).
    """
    check_nm_shape(scores.shape, n, m)
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    # rank_k = #{j : s_j > s_k} + #{j < k : s_j == s_k}: a total order that breaks ties towards the lower index,
    # in m*m elementwise comparisons (much faster than a stable sort for m = 4)
    rank = torch.zeros(groups.shape, dtype=torch.int8, device=scores.device)
    for j in range(m):
        other = groups[..., j : j + 1]
        beats = other > groups
        beats[..., j + 1 :] |= other == groups[..., j + 1 :]
        rank += beats
    return (rank < n).reshape(rows, cols)


def is_nm_mask(mask: Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive entries along the last axis has exactly ``n`` True."""
    if mask.shape[-1] % m:
        return False
    return bool((mask.reshape(*mask.shape[:-1], -1, m).sum(-1) == n).all())


@lru_cache(maxsize=16)
def _supports_cpu(n: int, m: int) -> Tensor:
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.long)


def nm_supports(n: int = 2, m: int = 4, device: torch.device | str = "cpu") -> Tensor:
    """All ``C(m, n)`` supports of a group as an ``(C, n)`` index tensor (6 x 2 for 2:4)."""
    return _supports_cpu(n, m).to(device)
