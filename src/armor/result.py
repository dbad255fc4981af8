"""What pruning one layer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .factors import block_product

__all__ = ["PruneResult"]


@dataclass
class PruneResult:
    """The pruned layer and how it was obtained.

    One convention for every method: ``core`` is the middle factor of the stored product
    ``W_hat = A' (core ⊙ mask) B'`` in the original scale of ``W``, where a missing wrapper is the identity.
    For ARMOR, ``a_blocks`` ``(P, bo, bo)`` and ``b_blocks`` ``(Q, bi, bi)`` are the diagonal blocks of
    ``A' = diag(r) A`` and ``B' = B diag(c)`` (the NoWag normalisation is folded into them, so ``core`` itself has
    unit-scale rows and columns); for the baselines they are ``None`` and ``core`` is the pruned weight.
    :meth:`dense_weight` always gives ``W_hat``.

    Losses are the normalised proxy loss of docs/algorithm.md §3 (1.0 means "all zeros").
    """

    method: str
    core: Tensor  # (out, in) float32, exactly zero where mask is False
    mask: Tensor  # (out, in) bool, n of every m kept along the input dimension
    loss: float
    nowag_loss: float
    n: int = 2
    m: int = 4
    a_blocks: Tensor | None = None
    b_blocks: Tensor | None = None
    block_size_out: int | None = None
    block_size_in: int | None = None
    history: list[float] = field(default_factory=list)  # best loss so far, after each iteration (0 = start)
    raw_history: list[float] = field(default_factory=list)  # loss of the current iterate (Adam may raise it)
    iterations: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    repaired_stats: int = 0  # entries of the Hessian diagonal replaced (non-finite or <= 0)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.core.shape)  # type: ignore[return-value]

    @property
    def has_wrappers(self) -> bool:
        return self.a_blocks is not None

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The reconstruction ``W_hat`` in the original scale, ``(out, in)``."""
        core = self.core * self.mask
        w = core if self.a_blocks is None else block_product(self.a_blocks, core, self.b_blocks)
        return w if dtype is None else w.to(dtype)

    def num_params(self) -> dict[str, int]:
        """Stored values: kept core entries and wrapper entries (2:4 positions not counted)."""
        kept = int(self.mask.sum())
        wrap = 0 if self.a_blocks is None else self.a_blocks.numel() + self.b_blocks.numel()
        return {"core": kept, "wrappers": wrap, "total": kept + wrap, "dense": self.core.numel()}

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record of the run (no tensors)."""
        return {
            "method": self.method,
            "shape": list(self.shape),
            "pattern": f"{self.n}:{self.m}",
            "loss": self.loss,
            "nowag_loss": self.nowag_loss,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 4),
            "stopped_early": self.stopped_early,
            "block_size_out": self.block_size_out,
            "block_size_in": self.block_size_in,
            "repaired_stats": self.repaired_stats,
            "params": self.num_params(),
            **{k: v for k, v in self.extras.items() if isinstance(v, (int, float, str, bool))},
        }
