"""Calibration statistics of one linear layer's input.

ARMOR, NoWag-P and Wanda need only the diagonal ``h_j = (2/N) sum_t x_{t,j}^2`` (docs/algorithm.md §1); SparseGPT
and armor-bh need the full second-moment matrix ``H = (2/N) X^T X`` (armor-bh only its diagonal blocks).  One
:class:`LayerStats` carries either: the diagonal is always there (it is the diagonal of ``H`` when ``H`` is
given), the full matrix only when it was collected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LayerStats", "StatsAccumulator", "repair_hessian_diag", "diagonal_blocks", "repair_hessian_blocks"]


def repair_hessian_diag(h: Tensor) -> tuple[Tensor, int]:
    """Replace non-finite or non-positive entries by the mean of the valid ones (docs/algorithm.md §1).

    Returns the repaired float32 copy and how many entries were replaced.  When no entry is valid (a layer that
    never saw input), every entry becomes 1, which makes the proxy loss plain Frobenius.
    """
    h = h.detach().to(torch.float32).clone()
    bad = ~torch.isfinite(h) | (h <= 0)
    n_bad = int(bad.sum())
    if n_bad:
        good = h[~bad]
        h[bad] = good.mean() if good.numel() else 1.0
    return h, n_bad


def diagonal_blocks(block_size: int, hessian: Tensor) -> Tensor:
    """The ``(n / block_size, block_size, block_size)`` diagonal blocks of the full ``hessian`` ``(n, n)``."""
    n = hessian.shape[0]
    if n % block_size:
        raise ValueError(f"block size {block_size} does not divide the {n} input features")
    k = n // block_size
    return hessian.reshape(k, block_size, k, block_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def repair_hessian_blocks(blocks: Tensor, repaired_diag: Tensor) -> Tensor:
    """``blocks`` ``(k, b, b)`` with non-finite entries zeroed, the rows and columns of features whose diagonal
    entry was invalid zeroed off the diagonal, and the diagonal set to ``repaired_diag`` (see
    :func:`repair_hessian_diag`); the blocks stay positive semi-definite up to rounding."""
    k, b, _ = blocks.shape
    out = torch.nan_to_num(blocks.detach().to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0).clone()
    bad = (~torch.isfinite(blocks.diagonal(dim1=1, dim2=2))) | (blocks.diagonal(dim1=1, dim2=2) <= 0)
    out = out * (~bad)[:, :, None] * (~bad)[:, None, :]
    diag = out.diagonal(dim1=1, dim2=2)
    diag.copy_(repaired_diag.reshape(k, b).to(out))
    return out


@dataclass
class LayerStats:
    """Input statistics of one linear layer.

    Attributes:
        hessian_diag: ``(n,)`` float32, ``(2/N) sum_t x_t^2`` per input feature.
        hessian: optional ``(n, n)`` float32, ``(2/N) X^T X``; required by SparseGPT.
        n_tokens: number of token vectors ``N`` the statistics were taken over (0 if unknown).
    """

    hessian_diag: Tensor
    hessian: Tensor | None = None
    n_tokens: int = 0

    def __post_init__(self) -> None:
        if self.hessian_diag.dim() != 1:
            raise ValueError(f"hessian_diag must be 1-D (in_features,), got shape {tuple(self.hessian_diag.shape)}")
        n = self.hessian_diag.shape[0]
        if self.hessian is not None and tuple(self.hessian.shape) != (n, n):
            raise ValueError(f"hessian must be ({n}, {n}) to match hessian_diag, got shape {tuple(self.hessian.shape)}")

    @property
    def in_features(self) -> int:
        return self.hessian_diag.shape[0]

    @classmethod
    def from_inputs(cls, x: Tensor, full: bool = False) -> LayerStats:
        """Statistics of a batch of inputs ``x`` of shape ``(..., n)``."""
        acc = StatsAccumulator(x.shape[-1], full=full, device=x.device)
        acc.update(x)
        return acc.finalize()

    def to(self, device: torch.device | str) -> LayerStats:
        return LayerStats(
            self.hessian_diag.to(device),
            None if self.hessian is None else self.hessian.to(device),
            self.n_tokens,
        )


@dataclass
class StatsAccumulator:
    """Running float32 sums for :class:`LayerStats`, fed batch by batch (e.g. from a forward hook).

    ``full`` collects ``X^T X`` as well as its diagonal.
    """

    in_features: int
    full: bool = False
    device: torch.device | str = "cpu"
    sum_sq: Tensor = field(init=False)
    sum_outer: Tensor | None = field(init=False)
    n_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.sum_sq = torch.zeros(self.in_features, dtype=torch.float32, device=self.device)
        self.sum_outer = (
            torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
            if self.full
            else None
        )

    def update(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(device=self.sum_sq.device, dtype=torch.float32)
        self.sum_sq += x.square().sum(0)
        if self.sum_outer is not None:
            self.sum_outer.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    def finalize(self) -> LayerStats:
        scale = 2.0 / max(self.n_tokens, 1)
        return LayerStats(
            self.sum_sq * scale,
            None if self.sum_outer is None else self.sum_outer * scale,
            self.n_tokens,
        )
