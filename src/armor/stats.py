"""Calibration statistics of one linear layer's input.

ARMOR, NoWag-P and Wanda need only the diagonal ``h_j = (2/N) sum_t x_{t,j}^2`` (docs/algorithm.md §1); SparseGPT
needs the full second-moment matrix ``H = (2/N) X^T X``.  One :class:`LayerStats` carries either: the diagonal is
always there (it is the diagonal of ``H`` when ``H`` is given), the full matrix only when it was collected.
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


def diagonal_blocks(block_size: int, hessian: Tensor | None = None, hessian_blocks: Tensor | None = None) -> Tensor:
    """The ``(n / block_size, block_size, block_size)`` diagonal blocks of ``H``.

    From the full ``hessian`` ``(n, n)``, or from stored ``hessian_blocks`` ``(n / bk, bk, bk)``: when
    ``block_size`` divides ``bk`` these are the diagonal sub-blocks (exact); when ``bk`` divides ``block_size``
    the stored blocks are laid out block-diagonally (the cross terms between them were not collected, so they
    are zero).  Any other combination is a ValueError.
    """
    if hessian is not None:
        n = hessian.shape[0]
        if n % block_size:
            raise ValueError(f"block size {block_size} does not divide the {n} input features")
        k = n // block_size
        return hessian.reshape(k, block_size, k, block_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
    if hessian_blocks is None:
        raise ValueError("diagonal blocks of the Hessian need the full Hessian or its stored diagonal blocks")
    k, bk, _ = hessian_blocks.shape
    n = k * bk
    if n % block_size:
        raise ValueError(f"block size {block_size} does not divide the {n} input features")
    if bk % block_size == 0:
        per = bk // block_size
        sub = hessian_blocks.reshape(k, per, block_size, per, block_size).diagonal(dim1=1, dim2=3)
        return sub.permute(0, 3, 1, 2).reshape(n // block_size, block_size, block_size).contiguous()
    if block_size % bk == 0:
        per = block_size // bk
        out = torch.zeros(
            n // block_size, block_size, block_size, dtype=hessian_blocks.dtype, device=hessian_blocks.device
        )
        grouped = hessian_blocks.reshape(n // block_size, per, bk, bk)
        for j in range(per):
            out[:, j * bk : (j + 1) * bk, j * bk : (j + 1) * bk] = grouped[:, j]
        return out
    raise ValueError(
        f"Hessian blocks of {bk} were collected; blocks of {block_size} need {bk} to divide it or be divided by it"
    )


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
        hessian_blocks: optional ``(n / bk, bk, bk)`` float32, the diagonal blocks of ``(2/N) X^T X``; used by
            the block-Hessian ARMOR objective (the full ``hessian`` serves too).
    """

    hessian_diag: Tensor
    hessian: Tensor | None = None
    n_tokens: int = 0
    hessian_blocks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.hessian_diag.dim() != 1:
            raise ValueError(f"hessian_diag must be 1-D (in_features,), got shape {tuple(self.hessian_diag.shape)}")
        n = self.hessian_diag.shape[0]
        if self.hessian is not None and tuple(self.hessian.shape) != (n, n):
            raise ValueError(f"hessian must be ({n}, {n}) to match hessian_diag, got shape {tuple(self.hessian.shape)}")
        if self.hessian_blocks is not None:
            hb = self.hessian_blocks
            if hb.dim() != 3 or hb.shape[1] != hb.shape[2] or hb.shape[0] * hb.shape[1] != n:
                raise ValueError(f"hessian_blocks must be (k, bk, bk) with k * bk = {n}, got shape {tuple(hb.shape)}")

    @property
    def in_features(self) -> int:
        return self.hessian_diag.shape[0]

    @property
    def has_full(self) -> bool:
        return self.hessian is not None

    @property
    def hessian_block_size(self) -> int | None:
        """Size of the stored diagonal blocks (``None`` when none were collected)."""
        return None if self.hessian_blocks is None else int(self.hessian_blocks.shape[1])

    def diagonal_blocks(self, block_size: int) -> Tensor:
        """The ``block_size`` diagonal blocks of ``H``, from the full matrix or the stored blocks; see
        :func:`diagonal_blocks`."""
        return diagonal_blocks(block_size, self.hessian, self.hessian_blocks)

    @classmethod
    def from_inputs(cls, x: Tensor, full: bool = False, block_size: int | None = None) -> LayerStats:
        """Statistics of a batch of inputs ``x`` of shape ``(..., n)``."""
        acc = StatsAccumulator(x.shape[-1], full=full, device=x.device, block_size=block_size)
        acc.update(x)
        return acc.finalize()

    def to(self, device: torch.device | str) -> LayerStats:
        return LayerStats(
            self.hessian_diag.to(device),
            None if self.hessian is None else self.hessian.to(device),
            self.n_tokens,
            None if self.hessian_blocks is None else self.hessian_blocks.to(device),
        )


@dataclass
class StatsAccumulator:
    """Running float32 sums for :class:`LayerStats`, fed batch by batch (e.g. from a forward hook).

    ``full`` collects ``X^T X``; ``block_size`` collects its ``block_size x block_size`` diagonal blocks only
    (``N n bk`` flops and ``n bk`` values instead of ``N n^2`` and ``n^2``).
    """

    in_features: int
    full: bool = False
    device: torch.device | str = "cpu"
    block_size: int | None = None
    sum_sq: Tensor = field(init=False)
    sum_outer: Tensor | None = field(init=False)
    sum_blocks: Tensor | None = field(init=False)
    n_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.sum_sq = torch.zeros(self.in_features, dtype=torch.float32, device=self.device)
        self.sum_outer = (
            torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
            if self.full
            else None
        )
        if self.block_size is not None and (self.block_size < 1 or self.in_features % self.block_size):
            raise ValueError(f"Hessian block size {self.block_size} does not divide {self.in_features} input features")
        k = None if self.block_size is None else self.in_features // self.block_size
        self.sum_blocks = (
            None
            if self.block_size is None
            else torch.zeros(k, self.block_size, self.block_size, dtype=torch.float32, device=self.device)
        )

    def update(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(device=self.sum_sq.device, dtype=torch.float32)
        self.sum_sq += x.square().sum(0)
        if self.sum_outer is not None:
            self.sum_outer.addmm_(x.T, x)
        if self.sum_blocks is not None:
            xb = x.reshape(x.shape[0], -1, self.block_size).transpose(0, 1)  # (k, N, bk)
            self.sum_blocks.baddbmm_(xb.transpose(1, 2), xb)
        self.n_tokens += x.shape[0]

    def finalize(self) -> LayerStats:
        scale = 2.0 / max(self.n_tokens, 1)
        return LayerStats(
            self.sum_sq * scale,
            None if self.sum_outer is None else self.sum_outer * scale,
            self.n_tokens,
            None if self.sum_blocks is None else self.sum_blocks * scale,
        )
