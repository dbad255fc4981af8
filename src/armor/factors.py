"""The ARMOR factorisation ``W_hat = A (W' ⊙ M) B`` as pure tensor code.

Block-diagonal matrices are stored as their diagonal blocks, shape ``(num_blocks, b, b)``.  A ``(m, n)`` matrix
seen in tiles is the 4-D view ``(P, bo, Q, bi)`` with ``m = P * bo`` and ``n = Q * bi``; because ``A`` and ``B``
are block diagonal, tile ``(p, q)`` of the product is ``A_p S_pq B_q`` and depends on tile ``(p, q)`` of the core
alone, which is what lets the solver treat all tiles at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "choose_block_size",
    "normalize_weight",
    "proxy_loss",
    "block_product",
    "blockdiag_to_dense",
    "identity_blocks",
    "tiles",
    "untile",
]

NORM_EPS = 1e-5


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


def normalize_weight(weight: Tensor, eps: float = NORM_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """NoWag normalisation (ALGORITHM.md §2): returns ``(Wn, r, c)`` with ``W = diag(r) Wn diag(c)``."""
    w = weight.to(torch.float32)
    c = w.norm(dim=0) + eps
    w1 = w / c
    r = w1.norm(dim=1) + eps
    return w1 / r[:, None], r, c


def proxy_loss(w_hat: Tensor, w_ref: Tensor, h: Tensor) -> Tensor:
    """``sum_ij h_j (w_hat - w_ref)_ij^2 / sum_ij h_j w_ref_ij^2`` (ALGORITHM.md §3); 1.0 for all zeros."""
    num = ((w_hat - w_ref).square() * h).sum()
    den = (w_ref.square() * h).sum()
    return num / den


def tiles(x: Tensor, bo: int, bi: int) -> Tensor:
    """View a ``(m, n)`` matrix as ``(P, Q, bo, bi)`` tiles (a copy, contiguous per tile)."""
    m, n = x.shape
    return x.reshape(m // bo, bo, n // bi, bi).permute(0, 2, 1, 3).contiguous()


def untile(t: Tensor) -> Tensor:
    """Inverse of :func:`tiles`."""
    p, q, bo, bi = t.shape
    return t.permute(0, 2, 1, 3).reshape(p * bo, q * bi)


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
