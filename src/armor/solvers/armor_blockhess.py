"""ARMOR on the block-Hessian proxy loss ("armor-bh"): beyond the paper, at the same footprint.

The paper weighs the error of the normalised weight by the diagonal of ``H = 2 X^T X / N`` alone.  Here it is
weighted by the ``bi x bi`` diagonal blocks ``H_q`` of ``H``, with ``bi`` the input block size of ``B``:

    ``L = sum_q tr(E_q H_q E_q^T) / sum_q tr(Wn_q H_q Wn_q^T)``,  ``E = A (W' ⊙ M) B - Wn``.

Its diagonal is the paper's loss; the off-diagonal terms are the correlations between the input features that
one block of ``B`` mixes, which is exactly what ``B`` can exploit.  Because ``A`` and ``B`` are block diagonal
the loss still splits by tile, and every step of the fast solver keeps its form (see
:class:`~armor.solvers.armor.ArmorProblem`): the ``B`` update keeps its closed form (``H_q`` cancels), the ``A``
update solves the block-weighted normal equation ``A_p (C_p H C_p^T) = Wn_p H C_p^T``, and the exact
sparse-core step uses ``G = B_g H_q B_g^T`` and ``f = B_g H_q E0^T a`` (``B_q L_q`` with ``L_q L_q^T = H_q``
in place of the paper's ``B_q diag(sqrt h_q)``).  It starts from NoWag-P's mask, so its final loss is never
above NoWag-P's under the same objective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..result import PruneResult
from ..stats import diagonal_blocks, repair_hessian_blocks
from .armor import ArmorProblem
from .armor_fast import SweepSettings, run_sweeps

__all__ = ["armor_blockhess"]


def armor_blockhess(
    wn: Tensor,
    h: Tensor,
    mask: Tensor,
    r: Tensor,
    c: Tensor,
    *,
    hessian: Tensor,
    n: int = 2,
    m: int = 4,
    callback: Callable[[int, float], None] | None = None,
    **options: Any,
) -> PruneResult:
    """The fast solver's sweeps (:func:`~armor.solvers.armor_fast.armor_fast`, same options:
    :class:`~armor.solvers.armor_fast.SweepSettings`) on the block-Hessian loss.

    Args:
        hessian: the full ``(n, n)`` ``2 X^T X / N``; its ``bi x bi`` diagonal blocks weight the loss.
        h: the (repaired) Hessian diagonal; it replaces the blocks' diagonal, so repaired features are weighted
            as in the paper's loss and have no cross terms.

    ``result.loss`` and ``result.nowag_loss`` are under the block-Hessian objective; ``extras["diagonal_loss"]``
    is the paper's proxy loss of the same result.
    """
    settings = SweepSettings.from_options(**options)
    bo, bi = settings.block_sizes(wn.shape[0], wn.shape[1], m)
    if hessian.dim() != 2:
        raise ValueError(f"hessian must be the full (n, n) matrix, got shape {tuple(hessian.shape)}")
    blocks = repair_hessian_blocks(diagonal_blocks(bi, hessian.to(wn.device)), h)
    problem = ArmorProblem(wn, h, bo, bi, n, m, h_blocks=blocks)
    result = run_sweeps("armor-bh", problem, mask, r, c, settings, callback)
    diag_problem = ArmorProblem(wn, h, bo, bi, n, m)
    a = result.a_blocks / r.reshape(problem.P, bo, 1)
    b = result.b_blocks / c.reshape(problem.Q, 1, bi)
    w_hat_n = diag_problem.left(a, diag_problem.right(result.core, b))
    result.extras["diagonal_loss"] = diag_problem.loss_of_residual(w_hat_n - wn)
    return result
