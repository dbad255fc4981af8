"""The ARMOR factorisation ``W_hat = A (W' ⊙ M) B`` as pure tensor code.

Block-diagonal matrices are stored as their diagonal blocks, shape ``(num_blocks, b, b)``.  A ``(m, n)`` matrix
seen in tiles is the 4-D view ``(P, bo, Q, bi)`` with ``m = P * bo`` and ``n = Q * bi``; because ``A`` and ``B``
are block diagonal, tile ``(p, q)`` of the product is ``A_p S_pq B_q`` and depends on tile ``(p, q)`` of the core
alone, which is what lets the solver treat all tiles at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_WRAPPER_BUDGET",
    "MAX_BLOCK_SIZE",
    "budget_block_sizes",
    "check_wrapper_budget",
    "choose_block_size",
    "resolve_block_sizes",
    "wrapper_overhead",
    "normalize_weight",
    "proxy_loss",
    "block_product",
    "blockdiag_to_dense",
    "identity_blocks",
]

NORM_EPS = 1e-5

#: The paper's wrapper share: block 128 on a 4096 x 4096 layer stores ``128 * (4096 + 4096)`` wrapper values,
#: 6.25% of the layer's ``4096 * 4096`` dense values.
DEFAULT_WRAPPER_BUDGET = 0.0625
#: The paper's (and the reference code's) block size; larger blocks are never chosen.
MAX_BLOCK_SIZE = 128


def choose_block_size(dim: int, requested: int, multiple_of: int = 1) -> int:
    """Largest divisor of ``dim`` that is ``<= requested`` and a multiple of ``multiple_of``.

    A uniform block size keeps every block-diagonal product one batched matmul.  For SmolLM2's 576 and a
    requested 128 this gives 96; for Llama's 4096/11008 and 128 it gives 128.  ``multiple_of`` is ``m`` of the
    n:m pattern for the input dimension, so no group of ``m`` straddles two tiles.
    """
    if requested < 1:
        raise ValueError(f"block size must be >= 1, got {requested}")
    for b in range(min(requested, dim), 0, -1):
        if dim % b == 0 and b % multiple_of == 0:
            return b
    raise ValueError(f"no block size <= {requested} divides {dim} and is a multiple of {multiple_of}")


def wrapper_overhead(out_features: int, in_features: int, block_out: int, block_in: int) -> float:
    """Wrapper values ``bo * out + bi * in`` (the blocks of ``A`` and ``B``) as a fraction of ``out * in``."""
    return (block_out * out_features + block_in * in_features) / (out_features * in_features)


def _divisors(dim: int, max_value: int, multiple_of: int = 1) -> list[int]:
    return [d for d in range(1, min(dim, max_value) + 1) if dim % d == 0 and d % multiple_of == 0]


def budget_block_sizes(
    out_features: int,
    in_features: int,
    budget: float = DEFAULT_WRAPPER_BUDGET,
    m: int = 4,
    max_block: int = MAX_BLOCK_SIZE,
) -> tuple[int, int]:
    """Wrapper block sizes ``(bo, bi)`` whose values add at most ``budget`` x the layer's dense values.

    ``bo`` divides ``out_features``; ``bi`` divides ``in_features`` and is a multiple of ``m`` (no group of the
    n:m pattern straddles two blocks); both are ``<= max_block``; ``bo * out + bi * in <= budget * out * in``.
    Among the pairs that fit, the one with the largest smaller block wins (a wrapper is only as expressive as its
    narrower side), then the one using most of the budget, then the larger ``bi``.  At the default budget
    (6.25%, the paper's share) Llama-2-7B's 4096x4096, 11008x4096 and 4096x11008 layers get ``(128, 128)``;
    SmolLM2's 576-wide layers get blocks of 8 to 32.  When even the smallest blocks ``(1, m)`` exceed the budget
    (layers of a few dozen features, e.g. tiny test models), those are returned: the overhead is then above the
    budget, and the solvers record it.

    Raises:
        ValueError: when ``budget`` is not a finite number > 0.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"wrapper budget must be a finite fraction > 0 of the dense values, got {budget!r}")
    if out_features < 1 or in_features < 1 or in_features % m:
        raise ValueError(
            f"cannot place wrappers on a {out_features}x{in_features} layer with groups of {m} along the input"
        )
    allowed = budget * out_features * in_features
    best: tuple[tuple[int, int, int], tuple[int, int]] | None = None
    for bi in _divisors(in_features, max_block, m):
        for bo in _divisors(out_features, max_block):
            used = bo * out_features + bi * in_features
            if used > allowed * (1 + 1e-12):
                continue
            key = (min(bo, bi), used, bi)
            if best is None or key > best[0]:
                best = (key, (bo, bi))
    if best is None:  # a layer of a few dozen features: even the smallest blocks exceed the budget
        return 1, m
    return best[1]


def check_wrapper_budget(options: dict, n: int, m: int) -> None:
    """Raise a ValueError when resolved method ``options`` give the wrappers a budget that, with an n:m core
    keeping ``n / m`` of the dense values, stores at least as many values as the dense layer (a budget is
    only read when no ``block_size`` is given)."""
    budget = options.get("wrapper_budget")
    if budget is None or options.get("block_size") is not None:
        return
    if budget >= 1 - n / m:
        raise ValueError(
            f"option 'wrapper_budget' {budget:g} leaves nothing saved at {n}:{m}: the core keeps {n / m:.0%} of the "
            f"dense values, so the wrappers must add less than {1 - n / m:g}"
        )


def resolve_block_sizes(
    out_features: int,
    in_features: int,
    block_size: int | None = None,
    budget: float = DEFAULT_WRAPPER_BUDGET,
    m: int = 4,
) -> tuple[int, int]:
    """The wrapper block sizes a solver uses: ``block_size`` when given (the largest divisors up to it, see
    :func:`choose_block_size`, no budget check), else :func:`budget_block_sizes` under ``budget``."""
    if block_size is None:
        return budget_block_sizes(out_features, in_features, budget, m)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int or None, got {block_size!r}")
    return choose_block_size(out_features, block_size), choose_block_size(in_features, block_size, multiple_of=m)


def normalize_weight(weight: Tensor, eps: float = NORM_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """NoWag normalisation (docs/algorithm.md §2): returns ``(Wn, r, c)`` with ``W = diag(r) Wn diag(c)``."""
    w = weight.to(torch.float32)
    c = w.norm(dim=0) + eps
    w1 = w / c
    r = w1.norm(dim=1) + eps
    return w1 / r[:, None], r, c


def proxy_loss(w_hat: Tensor, w_ref: Tensor, h: Tensor) -> Tensor:
    """``sum_ij h_j (w_hat - w_ref)_ij^2 / sum_ij h_j w_ref_ij^2`` (docs/algorithm.md §3); 1.0 for all zeros."""
    num = ((w_hat - w_ref).square() * h).sum()
    den = (w_ref.square() * h).sum()
    return num / den


def block_product(a_blocks: Tensor, core: Tensor, b_blocks: Tensor) -> Tensor:
    """``A core B`` for block-diagonal ``A`` ``(P, bo, bo)`` and ``B`` ``(Q, bi, bi)``; returns ``(m, n)``."""
    p, bo, _ = a_blocks.shape
    q, bi, _ = b_blocks.shape
    c = core.reshape(p, bo, q, bi)
    out = torch.einsum("pij,pjqk,qkl->piql", a_blocks, c, b_blocks)
    return out.reshape(p * bo, q * bi)


def blockdiag_to_dense(blocks: Tensor) -> Tensor:
    """The full ``(k*b, k*b)`` matrix of a block-diagonal stored as ``(k, b, b)``."""
    return torch.block_diag(*blocks.unbind(0))


def identity_blocks(num: int, b: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.eye(b, dtype=torch.float32, device=device).expand(num, b, b).clone()
