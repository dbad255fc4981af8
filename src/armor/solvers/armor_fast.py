"""A fast ARMOR solver: exact block updates instead of small Adam steps.

The proxy loss is a convex quadratic in each of ``A``, ``B`` and the kept core values separately, so each sweep
solves those sub-problems (nearly) exactly instead of taking one Adam step of ``lr=1e-4`` on all three:

1. ``A``: with ``C = S B`` fixed, block ``p`` solves ``min ||(A_p C_p - Wn_p) H^1/2||`` — normal equations
   ``A_p (C_p H C_p^T) = Wn_p H C_p^T``, one batched ``bo x bo`` Cholesky solve over all row blocks.
2. ``B``: with ``K = A S`` fixed, every column ``j`` of block ``q`` solves ``min ||K_q b - Wn_j||`` (its weight
   ``h_j`` cancels), so ``B_q = (K_q^T K_q)^-1 K_q^T Wn_q`` — one batched ``bi x bi`` solve.
3. Core values on the fixed mask: a few steps of Jacobi-preconditioned conjugate gradient.
4. Mask: one elementwise pass scores every group's exact best re-solve (support and values, as if alone:
   ``f = den/2 * dL/dS - G s |a|^2`` from the core gradient, see :func:`group_moves`); the best
   ``groups_per_tile`` moves of every tile are applied together and any tile whose loss rose is put back
   (:func:`greedy_mask_step`).

Both objectives of :class:`~armor.solvers.armor.ArmorProblem` run through the same sweeps (:func:`run_sweeps`):
the paper's diagonal proxy here, the block-Hessian one in :mod:`armor.solvers.armor_blockhess`.

Each block of ``A`` and ``B`` is kept only where its new value lowers that block's share of the loss, and the CG
and mask steps are monotone and checked, so the loss never rises: the guarantee holds by construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..result import PruneResult
from ..sparsity import nm_supports
from .armor import ArmorProblem, ArmorState, finish_result, tile_losses
from .options import SWEEP_OPTIONS, Option, WrapperSettings

__all__ = [
    "armor_fast",
    "run_sweeps",
    "SweepSettings",
    "GroupMoves",
    "group_moves",
    "group_gains",
    "greedy_mask_step",
    "update_a",
    "update_b",
    "update_core_cg",
]


def _solve_spd(normal: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """Solve ``X normal = rhs`` for a batch of symmetric PSD ``normal``, damped by ``damping * mean diag``."""
    k = normal.shape[-1]
    diag_mean = normal.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(k, device=normal.device, dtype=normal.dtype)
    chol, info = torch.linalg.cholesky_ex(normal + (damping * diag_mean)[:, None, None] * eye)
    if bool((info > 0).any()):  # very ill-conditioned: fall back to a least-squares solve
        return torch.linalg.lstsq(normal.transpose(1, 2), rhs.transpose(1, 2)).solution.transpose(1, 2)
    # an explicit inverse and one bmm: for many tiny blocks this is cheaper than batched triangular solves; the
    # refinement below restores a solve's accuracy, and a block's update is kept only where it lowers the loss
    inv = torch.cholesky_inverse(chol)
    x = torch.bmm(rhs, inv)
    return x + torch.bmm(rhs - torch.bmm(x, normal), inv)  # one step of refinement: back to a solve's accuracy


def _row_block_losses(problem: ArmorProblem, e: Tensor) -> Tensor:
    return (e * problem.weigh(e)).reshape(problem.P, problem.bo * problem.cols).sum(1)


def _col_block_losses(problem: ArmorProblem, e: Tensor) -> Tensor:
    return (e * problem.weigh(e)).reshape(problem.rows, problem.Q, problem.bi).sum((0, 2))


def update_a(problem: ArmorProblem, state: ArmorState, e: Tensor, damping: float) -> Tensor:
    """Exact least-squares update of every ``A`` block; returns the new residual."""
    P, bo, n = problem.P, problem.bo, problem.cols
    c = problem.right(state.core, state.b).reshape(P, bo, n)
    ch = problem.weigh(c.reshape(problem.rows, n)).reshape(P, bo, n)
    normal = torch.bmm(ch, c.transpose(1, 2))  # C_p H C_p^T
    rhs = torch.bmm(problem.wn.reshape(P, bo, n), ch.transpose(1, 2))  # Wn_p H C_p^T
    a_new = _solve_spd(normal, rhs, damping)
    e_new = torch.bmm(a_new, c).reshape(problem.rows, n) - problem.wn
    keep_new = _row_block_losses(problem, e_new) <= _row_block_losses(problem, e)
    state.a.copy_(torch.where(keep_new[:, None, None], a_new, state.a))
    return torch.where(keep_new.repeat_interleave(bo)[:, None], e_new, e)


def update_b(problem: ArmorProblem, state: ArmorState, e: Tensor, damping: float) -> Tensor:
    """Exact least-squares update of every ``B`` block (column weights cancel); returns the new residual."""
    Q, bi, rows = problem.Q, problem.bi, problem.rows
    k = problem.left(state.a, state.core).reshape(rows, Q, bi).transpose(0, 1)  # (Q, m, bi)
    normal = torch.bmm(k.transpose(1, 2), k)  # K_q^T K_q
    rhs = torch.bmm(problem.wn.reshape(rows, Q, bi).permute(1, 2, 0), k)  # (K_q^T Wn_q)^T as (Q, bi, bi)
    b_new = _solve_spd(normal, rhs, damping).transpose(1, 2)
    e_new = torch.bmm(k, b_new).transpose(0, 1).reshape(rows, problem.cols) - problem.wn
    keep_new = _col_block_losses(problem, e_new) <= _col_block_losses(problem, e)
    state.b.copy_(torch.where(keep_new[:, None, None], b_new, state.b))
    return torch.where(keep_new.repeat_interleave(bi)[None, :], e_new, e)


def update_core_cg(problem: ArmorProblem, state: ArmorState, e: Tensor, steps: int) -> Tensor:
    """``steps`` of Jacobi-preconditioned CG on the kept core values; returns the new residual.

    Works on ``f(S) = ||(A S B - Wn) H^1/2||^2 / 2`` restricted to the mask.  The diagonal of its Hessian is
    ``|A_p[:, i]|^2 * sum_l B_q[j, l]^2 h_l``.
    """
    if steps <= 0:
        return e
    mask = state.mask.to(e.dtype)
    a_sq = state.a.square().sum(1).reshape(problem.rows)  # |A_p[:, i]|^2 per global row
    q_all = torch.arange(problem.Q, device=e.device)
    bh = (problem.weighted_rows(state.b, q_all) * state.b).sum(2).reshape(problem.cols)  # diag(B_q H_q B_q^T)
    precond = mask / (a_sq[:, None] * bh[None, :]).clamp_min(1e-30)

    def grad_of(res: Tensor) -> Tensor:
        return problem.right(problem.left_t(state.a, problem.weigh(res)), state.b, transpose=True) * mask

    g = grad_of(e)
    z = precond * g
    d = -z
    rz = float((g * z).sum())
    s_start, e_start = state.core.clone(), e
    for _ in range(steps):
        if rz <= 0:
            break
        ad = problem.reconstruct(ArmorState(state.a, state.b, d, state.mask))  # A d B: change of E per unit
        w_ad = problem.weigh(ad)
        curvature = float((ad * w_ad).sum())
        if curvature <= 0:
            break
        alpha = rz / curvature
        state.core.add_(d, alpha=alpha)
        e = e + alpha * ad
        g = g + alpha * (problem.right(problem.left_t(state.a, w_ad), state.b, transpose=True) * mask)
        z = precond * g
        rz_new = float((g * z).sum())
        d = -z + (rz_new / rz) * d
        rz = rz_new
    e = problem.residual(state)  # recompute: no drift carried into the next step
    if problem.loss_of_residual(e) > problem.loss_of_residual(e_start):  # only rounding can do this
        state.core.copy_(s_start)
        return e_start
    return e


@dataclass
class GroupMoves:
    """The exact best re-solve of every group as if alone, ``(rows, cols/m)`` layout."""

    gain: Tensor  # decrease of the weighted loss (not normalised), >= 0; 0 where the current group is kept
    support: Tensor  # (rows, groups, n) long: the best support's positions within the group
    values: Tensor  # (rows, groups, n) its optimal values


def group_moves(problem: ArmorProblem, state: ArmorState, grad_core: Tensor) -> GroupMoves:
    """Exact best support, values and loss decrease of re-solving each group alone.

    For group (row ``i``, columns ``g``) of tile ``(p, q)``: with ``G = B_g H_q B_g^T`` and ``a = A_p[:, i]``,
    ``f = B_g H_q E0^T a`` (the group zeroed) equals ``den/2 * dL/dS[i, g] - G s |a|^2``, so every group costs
    one elementwise pass once the core gradient is known; ``G`` is shared by all rows.
    """
    rows, cols, m, n = problem.rows, problem.cols, problem.m, problem.n
    gpr = problem.bi // m
    a_sq = state.a.square().sum(1).reshape(rows, 1)  # (rows, 1)
    q_all = torch.arange(problem.Q, device=grad_core.device)
    bh = problem.weighted_rows(state.b, q_all).reshape(problem.Q, gpr, m, problem.bi)
    b4 = state.b.reshape(problem.Q, gpr, m, problem.bi)
    gm = torch.einsum("qgkl,qgjl->qgkj", bh, b4).reshape(cols // m, m, m)  # B_g H_q B_g^T per column group
    s = state.core.reshape(rows, cols // m, m)
    gs = torch.bmm(s.transpose(0, 1), gm).transpose(0, 1)  # G s per group (G symmetric): (rows, groups, m)
    f = grad_core.reshape(rows, cols // m, m) * (problem.denominator / 2) - gs * a_sq[:, :, None]
    cur = 2 * (s * f).sum(-1) + a_sq * (s * gs).sum(-1)  # change of the current values against zero
    supports = nm_supports(n, m, grad_core.device)
    f_s = f[..., supports]  # (rows, groups, C, n)
    g_s = gm[:, supports[:, :, None], supports[:, None, :]]  # (groups, C, n, n)
    eye = torch.eye(n, device=grad_core.device)
    ridge = 1e-10 * g_s.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    g_inv = torch.linalg.inv(g_s + ridge * eye)  # shared by all rows
    # f^T G^-1 f for every row, group and support: n*n elementwise terms beat a batched matmul by far
    # (G^-1 is symmetric: the i < j terms twice)
    quad = sum(g_inv[..., i, i] * f_s[..., i].square() for i in range(n)) + 2 * sum(
        g_inv[..., i, j] * f_s[..., i] * f_s[..., j] for i in range(n) for j in range(i + 1, n)
    )
    best = quad.argmax(-1)  # the best support has the largest f^T G^-1 f (its loss change is -quad / |a|^2)
    f_b = f_s.gather(2, best[..., None, None].expand(rows, cols // m, 1, n)).squeeze(2)  # (rows, groups, n)
    group_idx = torch.arange(cols // m, device=grad_core.device)
    g_b = g_s[group_idx, best]  # (rows, groups, n, n)
    g_inv_b = g_inv[group_idx, best]
    inv_a_sq = 1 / a_sq.clamp_min(1e-30)
    values = (
        -torch.stack([sum(g_inv_b[..., i, j] * f_b[..., j] for j in range(n)) for i in range(n)], -1)
        * inv_a_sq[:, :, None]
    )
    # the exact change 2 v.f + |a|^2 v^T G v of the chosen values, so a near-singular G never looks better than it is
    g_v = torch.stack([sum(g_b[..., i, j] * values[..., j] for j in range(n)) for i in range(n)], -1)
    best_delta = 2 * (values * f_b).sum(-1) + a_sq * (values * g_v).sum(-1)
    gain = (cur - best_delta).clamp_min(0)
    return GroupMoves(gain, supports[best], values)


def group_gains(problem: ArmorProblem, state: ArmorState, grad_core: Tensor) -> Tensor:
    """Exact loss decrease (in weighted, unnormalised units) of re-solving each group alone,
    ``(rows, cols/m)``; see :func:`group_moves`."""
    return group_moves(problem, state, grad_core).gain


def greedy_mask_step(problem: ArmorProblem, state: ArmorState, e: Tensor, per_tile: int) -> tuple[Tensor, float]:
    """Apply the ``per_tile`` best group moves of every tile at once, checked tile by tile.

    Each move is exact for its group alone; groups of one tile interact only through ``a_i . a_j`` and
    ``B_g H B_h^T``, which are small near ``A = B = I``.  A tile whose loss did not fall is put back, so the step
    never raises the loss.  Returns the new residual and the change of the proxy loss.
    """
    P, Q, bo, m, rows, cols = problem.P, problem.Q, problem.bo, problem.m, problem.rows, problem.cols
    gpr = problem.bi // m
    moves = group_moves(problem, state, problem.core_gradient(state, e))
    tiled = moves.gain.reshape(P, bo, Q, gpr)
    k = min(per_tile, bo * gpr)
    kth = tiled.permute(0, 2, 1, 3).reshape(P, Q, bo * gpr).topk(k, dim=2).values[..., -1]
    chosen = ((tiled >= kth[:, None, :, None]) & (tiled > 0)).reshape(rows, cols // m)
    if not bool(chosen.any()):
        return e, 0.0
    old_core, old_mask = state.core.clone(), state.mask.clone()
    new_vals = torch.zeros(rows, cols // m, m, device=e.device).scatter_(2, moves.support, moves.values)
    new_mask = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=e.device).scatter_(2, moves.support, True)
    sel = chosen[:, :, None]
    state.core.copy_(torch.where(sel, new_vals, state.core.reshape(rows, cols // m, m)).reshape(rows, cols))
    state.mask.copy_(torch.where(sel, new_mask, state.mask.reshape(rows, cols // m, m)).reshape(rows, cols))
    before = tile_losses(problem, e)
    e_new = problem.residual(state)
    after = tile_losses(problem, e_new)
    worse = after > before
    if bool(worse.any()):  # put those tiles back
        back = worse.reshape(P, 1, Q, 1).expand(P, bo, Q, problem.bi).reshape(rows, cols)
        state.core.copy_(torch.where(back, old_core, state.core))
        state.mask.copy_(torch.where(back, old_mask, state.mask))
        e_new = torch.where(back, e, e_new)
        after = torch.where(worse, before, after)
    return e_new, float((after - before).sum()) / problem.denominator


@dataclass(frozen=True)
class SweepSettings(WrapperSettings):
    """The sweeps' options (:data:`~armor.solvers.options.SWEEP_OPTIONS`, where their defaults and meanings are),
    one value each; build it with :meth:`from_options`."""

    TABLE: ClassVar[tuple[Option, ...]] = SWEEP_OPTIONS
    OWNER: ClassVar[str] = "the sweeps (armor-fast, armor-bh)"

    sweeps: int
    cg_steps: int
    mask_steps: int
    groups_per_tile: int
    damping: float
    patience: int
    rtol: float
    max_seconds: float | None


def armor_fast(
    wn: Tensor,
    h: Tensor,
    mask: Tensor,
    r: Tensor,
    c: Tensor,
    *,
    n: int = 2,
    m: int = 4,
    callback: Callable[[int, float], None] | None = None,
    **options: Any,
) -> PruneResult:
    """Fast ARMOR on the paper's (diagonal) proxy loss: ``sweeps`` rounds of exact ``A`` and ``B`` updates,
    ``cg_steps`` CG steps on the core values and ``mask_steps`` greedy sparse-core steps.  Stops early when
    ``patience`` sweeps in a row improve the loss by less than a relative ``rtol``, or after ``max_seconds``.
    Deterministic.  ``history[k]`` is the loss after sweep ``k``.  ``options``: :class:`SweepSettings`
    (wrapper blocks: ``block_size`` when given, else the largest within ``wrapper_budget``).
    """
    settings = SweepSettings.from_options(**options)
    bo, bi = settings.block_sizes(wn.shape[0], wn.shape[1], m)
    return run_sweeps("armor-fast", ArmorProblem(wn, h, bo, bi, n, m), mask, r, c, settings, callback)


def run_sweeps(
    method: str,
    problem: ArmorProblem,
    mask: Tensor,
    r: Tensor,
    c: Tensor,
    settings: SweepSettings,
    callback: Callable[[int, float], None] | None = None,
) -> PruneResult:
    """The fast solver's sweeps on any :class:`ArmorProblem` (either objective), from the NoWag-P ``mask``."""
    state = problem.initial_state(mask)
    e = problem.residual(state)
    loss = problem.loss_of_residual(e)
    history, raw_history = [loss], [loss]
    best = state.clone()
    t0 = time.perf_counter()
    stalled, stopped_early, sweep = 0, False, 0
    for sweep in range(1, settings.sweeps + 1):
        before = loss
        e = update_a(problem, state, e, settings.damping)
        e = update_b(problem, state, e, settings.damping)
        e = update_core_cg(problem, state, e, settings.cg_steps)
        for _ in range(settings.mask_steps):
            e, change = greedy_mask_step(problem, state, e, settings.groups_per_tile)
            if change == 0:
                break
        loss = problem.loss_of_residual(e)  # every step returns the exact residual of its state
        if loss > before:  # only rounding can do this: go back to the sweep's start and stop
            state.copy_(best)
            e, loss = problem.residual(state), before
            stopped_early = True
        else:
            best.copy_(state)
        history.append(loss)
        raw_history.append(loss)
        if callback is not None:
            callback(sweep, loss)
        if stopped_early:
            break
        stalled = stalled + 1 if loss > before * (1 - settings.rtol) else 0
        if settings.patience > 0 and stalled >= settings.patience:
            stopped_early = True
            break
        if settings.max_seconds is not None and time.perf_counter() - t0 >= settings.max_seconds:
            stopped_early = True
            break
    extras = {
        "mode": "fast",
        "cg_steps": settings.cg_steps,
        "mask_steps": settings.mask_steps,
        "solve_seconds": time.perf_counter() - t0,
        **settings.extras(),
    }
    return finish_result(method, problem, state, loss, r, c, history, raw_history, sweep, stopped_early, extras)
