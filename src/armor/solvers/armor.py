"""ARMOR for one layer: ``Wn_hat = A (W' ⊙ M) B`` fitted by block coordinate descent (docs/algorithm.md §4–6).

This file holds the paper's algorithm:

* :class:`ArmorProblem` — the normalised weight, the Hessian diagonal and the tiling, with the block-diagonal
  products and the exact gradients of the proxy loss;
* :func:`sparse_core_step` — the exact re-solve of one group of ``m`` core entries per tile over all
  ``C(m, n)`` supports, batched over every tile at once;
* :func:`armor_faithful` — the reference schedule: one joint Adam step on ``A``, ``B`` and the kept core values,
  then one sparse-core step, per iteration; the best state seen is returned, so the result is never worse than
  NoWag-P (Theorem 3.1 as a property of the code).

The fast solver (:mod:`armor.solvers.armor_fast`) reuses the problem (either objective) and its products.

Layout: matrices are kept as full ``(m, n)`` tensors; ``A`` is ``(P, bo, bo)`` and ``B`` is ``(Q, bi, bi)``, so
``A X`` is one batched matmul over row blocks and ``X B`` one over column blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..factors import choose_block_size, identity_blocks, wrapper_overhead
from ..result import PruneResult
from ..sparsity import nm_supports
from .options import FAITHFUL_OPTIONS, Option, WrapperSettings

__all__ = [
    "ArmorProblem",
    "ArmorState",
    "GroupSolution",
    "solve_groups",
    "sparse_core_step",
    "tile_losses",
    "armor_faithful",
    "finish_result",
]


@dataclass
class ArmorState:
    """The iterate: wrapper blocks, core values (zero off the mask) and the mask, all float32."""

    a: Tensor  # (P, bo, bo)
    b: Tensor  # (Q, bi, bi)
    core: Tensor  # (m, n)
    mask: Tensor  # (m, n) bool

    def clone(self) -> ArmorState:
        return ArmorState(self.a.clone(), self.b.clone(), self.core.clone(), self.mask.clone())

    def copy_(self, other: ArmorState) -> None:
        self.a.copy_(other.a)
        self.b.copy_(other.b)
        self.core.copy_(other.core)
        self.mask.copy_(other.mask)


class ArmorProblem:
    """The layer-wise proxy loss and its tiling.

    Two objectives share every step of the solvers:

    * diagonal (the paper's, ``h_blocks=None``): ``||(A S B - Wn) diag(sqrt h)||^2 / ||Wn diag(sqrt h)||^2``;
    * block-Hessian (``h_blocks`` given, ``(Q, bi, bi)``): ``tr(E Hq E^T)`` summed over the column blocks ``q``
      of ``E = A S B - Wn``, with ``Hq`` the ``bi x bi`` diagonal block of ``2 X^T X / N`` (normalised the same
      way).  Because ``B`` has the same column blocks, the loss still splits by tile.

    Every step needs the objective only through :meth:`weigh` (``E`` times the weight: ``E diag(h)`` or
    ``E blockdiag(Hq)``) and :meth:`weighted_rows` (rows of ``B_q`` times the weight).  ``h`` is always the
    diagonal of the weight.
    """

    def __init__(
        self,
        wn: Tensor,
        h: Tensor,
        block_out: int,
        block_in: int,
        n: int = 2,
        m: int = 4,
        h_blocks: Tensor | None = None,
    ) -> None:
        self.wn = wn
        self.rows, self.cols = wn.shape
        self.bo = choose_block_size(self.rows, block_out)
        self.bi = choose_block_size(self.cols, block_in, multiple_of=m)
        self.P = self.rows // self.bo
        self.Q = self.cols // self.bi
        self.n, self.m = n, m
        if h_blocks is not None and tuple(h_blocks.shape) != (self.Q, self.bi, self.bi):
            raise ValueError(
                f"h_blocks must be ({self.Q}, {self.bi}, {self.bi}) for input blocks of {self.bi}, "
                f"got {tuple(h_blocks.shape)}"
            )
        self.h_blocks = h_blocks
        self.h = h if h_blocks is None else h_blocks.diagonal(dim1=1, dim2=2).reshape(self.cols)
        self.denominator = float((wn * self.weigh(wn)).sum())
        if not self.denominator > 0:
            raise ValueError("the weight is all zeros (or the statistics are): the proxy loss is undefined")

    @property
    def objective(self) -> str:
        return "diagonal" if self.h_blocks is None else "block-hessian"

    def weigh(self, x: Tensor) -> Tensor:
        """``X`` times the loss weight: ``X diag(h)`` or ``X blockdiag(H_q)``, ``(m, n)``."""
        return x * self.h if self.h_blocks is None else self.right(x, self.h_blocks)

    def weighted_rows(self, b_rows: Tensor, q_idx: Tensor) -> Tensor:
        """Rows ``(G, k, bi)`` of ``B_q`` (block ``q_idx[g]``) times the weight of their column block."""
        if self.h_blocks is None:
            return b_rows * self.h.reshape(self.Q, 1, self.bi)[q_idx]
        return torch.bmm(b_rows, self.h_blocks[q_idx])

    # -- block-diagonal products -------------------------------------------------------------------------
    def left(self, a: Tensor, x: Tensor) -> Tensor:
        """``A X`` for block-diagonal ``A``."""
        return torch.bmm(a, x.reshape(self.P, self.bo, self.cols)).reshape(self.rows, self.cols)

    def left_t(self, a: Tensor, x: Tensor) -> Tensor:
        """``A^T X``."""
        return torch.bmm(a.transpose(1, 2), x.reshape(self.P, self.bo, self.cols)).reshape(self.rows, self.cols)

    def right(self, x: Tensor, b: Tensor, transpose: bool = False) -> Tensor:
        """``X B`` (or ``X B^T``) for block-diagonal ``B``."""
        xq = x.reshape(self.rows, self.Q, self.bi).transpose(0, 1)  # (Q, m, bi)
        out = torch.bmm(xq, b.transpose(1, 2) if transpose else b)
        return out.transpose(0, 1).reshape(self.rows, self.cols)

    def reconstruct(self, state: ArmorState) -> Tensor:
        return self.left(state.a, self.right(state.core, state.b))

    def residual(self, state: ArmorState) -> Tensor:
        """``E = A S B - Wn`` (unweighted)."""
        return self.reconstruct(state) - self.wn

    def loss_of_residual(self, e: Tensor) -> float:
        return float((e * self.weigh(e)).sum()) / self.denominator

    def gradients(self, state: ArmorState, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Exact gradients of the proxy loss w.r.t. ``A`` blocks, ``B`` blocks and the dense core.

        The core gradient is for every entry (pruned ones included); the continuous step masks it, the
        sparse-core step samples groups by its L1 norm.
        """
        r = self.weigh(e) * (2.0 / self.denominator)  # dL/dW_hat
        sb = self.right(state.core, state.b)
        grad_a = torch.bmm(
            r.reshape(self.P, self.bo, self.cols), sb.reshape(self.P, self.bo, self.cols).transpose(1, 2)
        )
        a_s = self.left(state.a, state.core)
        grad_b = torch.bmm(
            a_s.reshape(self.rows, self.Q, self.bi).permute(1, 2, 0),
            r.reshape(self.rows, self.Q, self.bi).transpose(0, 1),
        )
        grad_core = self.right(self.left_t(state.a, r), state.b, transpose=True)
        return grad_a, grad_b, grad_core

    def core_gradient(self, state: ArmorState, e: Tensor) -> Tensor:
        """``dL/dS`` for every core entry (the third output of :meth:`gradients`, without the other two)."""
        return self.right(self.left_t(state.a, self.weigh(e) * (2.0 / self.denominator)), state.b, transpose=True)

    def initial_state(self, mask: Tensor) -> ArmorState:
        """NoWag-P (docs/algorithm.md §5): ``A = B = I``, ``W' = Wn`` on the given mask."""
        dev = self.wn.device
        return ArmorState(
            identity_blocks(self.P, self.bo, dev), identity_blocks(self.Q, self.bi, dev), self.wn * mask, mask.clone()
        )


@dataclass
class GroupSolution:
    """Exact re-solves of a batch of groups, each against the current residual as if it were alone."""

    tile: Tensor  # (G,) flat tile index p * Q + q, sorted
    row: Tensor  # (G,) global row
    cols: Tensor  # (G, m) global columns
    a_col: Tensor  # (G, bo) A_p[:, i]
    b_rows: Tensor  # (G, m, bi) the group's rows of B_q
    old: Tensor  # (G, m) current values (zero off the mask)
    old_mask: Tensor  # (G, m) bool
    new: Tensor  # (G, m) best values, zero off the best support
    new_mask: Tensor  # (G, m) bool
    gain: Tensor  # (G,) decrease of the H-weighted tile loss, >= 0; 0 where the current group is kept


def solve_groups(problem: ArmorProblem, state: ArmorState, e: Tensor, tile: Tensor, pick: Tensor) -> GroupSolution:
    """Solve group ``pick`` (row-major index within the tile, ``i * (bi/m) + g``) of each listed tile exactly.

    With the group zeroed, the tile residual is ``E0 = A_p S_pq B_q - Wn_pq`` and the tile loss
    ``tr(E0 H_q E0^T)`` (``H_q = diag(h_q)`` for the paper's objective); writing values ``v`` on support ``s``
    adds ``a v^T B_s`` where ``a = A_p[:, i]`` and ``B_s`` are the group's rows of ``B_q``.  The best ``v`` on
    ``s`` solves ``G_s v = -f_s / |a|^2`` with ``G = B_g H_q B_g^T`` and ``f = B_g H_q E0^T a`` (with a factor
    ``L_q L_q^T = H_q`` this is the paper's ``Bt = B_g L_q`` form).  Every candidate, the current values
    included, is scored by its exact change ``2 v.f + |a|^2 v^T G v``, so the choice never raises the loss,
    even where ``G_s`` is singular.
    """
    Q, bo, bi, m = problem.Q, problem.bo, problem.bi, problem.m
    gpr = bi // m
    dev = e.device
    p_idx, q_idx = tile // Q, tile % Q
    local_i, local_g = pick // gpr, (pick % gpr) * m
    row = p_idx * bo + local_i
    cols = (q_idx * bi + local_g)[:, None] + torch.arange(m, device=dev)

    a_col = state.a[p_idx, :, local_i]  # (G, bo)
    a_sq = a_col.square().sum(1)
    b_rows = state.b[q_idx[:, None], local_g[:, None] + torch.arange(m, device=dev)]  # (G, m, bi)
    bh = problem.weighted_rows(b_rows, q_idx)  # B_g H_q, (G, m, bi)
    old = state.core[row[:, None], cols]
    old_mask = state.mask[row[:, None], cols]
    # E_pq^T a for every group: with one group per tile a pass over E's tiles; with many, rows of A^T E
    if len(tile) == problem.P * Q and bool((tile == torch.arange(len(tile), device=dev)).all()):
        e_tiles = e.reshape(problem.P, bo, Q, bi)
        et_a = torch.einsum("pjql,pqj->pql", e_tiles, a_col.reshape(problem.P, Q, bo)).reshape(-1, bi)
    else:
        at_e = problem.left_t(state.a, e).reshape(problem.rows, Q, bi)
        et_a = at_e[row, q_idx]
    g_all = torch.bmm(bh, b_rows.transpose(1, 2))  # B_g H_q B_g^T
    f_all = torch.einsum("gkl,gl->gk", bh, et_a) - torch.einsum("gkj,gj->gk", g_all, old) * a_sq[:, None]

    supports = nm_supports(problem.n, m, dev)
    f_s = f_all[:, supports]  # (G, C, n)
    g_s = g_all[:, supports[:, :, None], supports[:, None, :]]  # (G, C, n, n)
    eye = torch.eye(problem.n, device=dev)
    ridge = 1e-10 * g_s.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    v = -torch.linalg.solve(g_s + ridge * eye, f_s.unsqueeze(-1)).squeeze(-1) / a_sq.clamp_min(1e-30)[:, None, None]
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    delta_s = 2 * (v * f_s).sum(-1) + a_sq[:, None] * torch.einsum("gci,gcij,gcj->gc", v, g_s, v)
    delta_cur = 2 * (old * f_all).sum(-1) + a_sq * torch.einsum("gi,gij,gj->g", old, g_all, old)
    best_delta, best_s = delta_s.min(dim=1)
    accept = best_delta < delta_cur  # strict: ties keep the current support

    chosen = supports[best_s]  # (G, n)
    new = torch.zeros_like(old).scatter_(1, chosen, v[torch.arange(len(tile), device=dev), best_s])
    new_mask = torch.zeros_like(old, dtype=torch.bool).scatter_(1, chosen, True)
    new = torch.where(accept[:, None], new, old)
    new_mask = torch.where(accept[:, None], new_mask, old_mask)
    gain = torch.where(accept, delta_cur - best_delta, torch.zeros_like(best_delta))
    return GroupSolution(tile, row, cols, a_col, b_rows, old, old_mask, new, new_mask, gain)


def _apply(problem: ArmorProblem, state: ArmorState, e: Tensor, sol: GroupSolution) -> None:
    """Write ``sol`` into the core and the mask, and add each group's rank-1 change to its tile of ``e``."""
    state.core[sol.row[:, None], sol.cols] = sol.new
    state.mask[sol.row[:, None], sol.cols] = sol.new_mask
    P, Q, bo, bi = problem.P, problem.Q, problem.bo, problem.bi
    row_change = torch.einsum("gk,gkl->gl", sol.new - sol.old, sol.b_rows)  # (G, bi)
    # Sum of the rank-1 changes of each tile as one batched matmul: groups go into per-tile slots
    # (``sol.tile`` is sorted, so a group's slot is its offset from the first group of its tile).
    slot = torch.arange(len(sol.tile), device=e.device) - torch.searchsorted(sol.tile, sol.tile)
    k = int(slot.max()) + 1
    a_pad = torch.zeros(P * Q, k, bo, device=e.device)
    r_pad = torch.zeros(P * Q, k, bi, device=e.device)
    a_pad[sol.tile, slot] = sol.a_col
    r_pad[sol.tile, slot] = row_change
    per_tile = torch.bmm(a_pad.transpose(1, 2), r_pad)  # (P*Q, bo, bi)
    e.reshape(P, bo, Q, bi).add_(per_tile.reshape(P, Q, bo, bi).permute(0, 2, 1, 3))


def _tile_scores(problem: ArmorProblem, group_scores: Tensor) -> Tensor:
    """``(rows, cols/m)`` group scores as ``(P*Q, bo*bi/m)``, row-major within each tile."""
    gpr = problem.bi // problem.m
    return (
        group_scores.reshape(problem.P, problem.bo, problem.Q, gpr)
        .permute(0, 2, 1, 3)
        .reshape(problem.P * problem.Q, problem.bo * gpr)
    )


def sparse_core_step(
    problem: ArmorProblem,
    state: ArmorState,
    e: Tensor,
    group_scores: Tensor,
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> float:
    """Re-solve one group of ``m`` core entries in every ``bo x bi`` tile, exactly, all tiles at once.

    Because ``A`` and ``B`` are block diagonal, a group touches only its own tile of ``A S B``, so the groups of
    different tiles are independent.  The group of each tile is sampled in proportion to ``group_scores``
    ``(rows, cols/m)`` (the reference uses the L1 norm of ``dL/dS`` over the group), or the best-scoring one
    when ``greedy``; :func:`solve_groups` does the exact solve.  Updates ``state.core``, ``state.mask`` and the
    residual ``e`` in place; returns the (non-positive) change of the proxy loss.
    """
    scores = _tile_scores(problem, group_scores)
    if greedy:
        pick = scores.argmax(dim=1)
    else:
        scores = torch.where(scores.sum(1, keepdim=True) > 0, scores, torch.ones_like(scores))
        pick = torch.multinomial(scores, 1, generator=generator).squeeze(1)
    sol = solve_groups(problem, state, e, torch.arange(len(pick), device=e.device), pick)
    _apply(problem, state, e, sol)
    return -float(sol.gain.sum()) / problem.denominator


def tile_losses(problem: ArmorProblem, e: Tensor) -> Tensor:
    """The weighted loss of every ``bo x bi`` tile of the residual ``e`` (not normalised), ``(P*Q,)``."""
    w = (e * problem.weigh(e)).reshape(problem.P, problem.bo, problem.Q, problem.bi)
    return w.sum((1, 3)).reshape(-1)


def _adam_update(
    param: Tensor, grad: Tensor, m1: Tensor, m2: Tensor, step: int, lr: float, betas=(0.9, 0.999), eps=1e-8
) -> None:
    """One Adam step (Kingma & Ba), in place, with bias correction."""
    m1.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    m2.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    denom = (m2 / (1 - betas[1] ** step)).sqrt_().add_(eps)
    param.addcdiv_(m1, denom, value=-lr / (1 - betas[0] ** step))


class _Stopper:
    """Stop after ``patience`` iterations without a relative improvement of ``rtol`` in the best loss."""

    def __init__(self, loss: float, patience: int, rtol: float) -> None:
        self.reference, self.patience, self.rtol, self.waited = loss, patience, rtol, 0

    def update(self, best: float) -> bool:
        if best < self.reference * (1 - self.rtol):
            self.reference, self.waited = best, 0
        else:
            self.waited += 1
        return self.patience > 0 and self.waited >= self.patience


def finish_result(
    method: str,
    problem: ArmorProblem,
    best: ArmorState,
    best_loss: float,
    r: Tensor,
    c: Tensor,
    history: list[float],
    raw_history: list[float],
    iterations: int,
    stopped_early: bool,
    extras: dict,
) -> PruneResult:
    """Fold the normalisation into the wrappers (``A' = diag(r) A``, ``B' = B diag(c)``) and package.

    ``extras`` gets the objective and ``wrapper_overhead`` (wrapper values / dense values of the layer).
    """
    extras = {
        **extras,
        "objective": problem.objective,
        "wrapper_overhead": wrapper_overhead(problem.rows, problem.cols, problem.bo, problem.bi),
    }
    a_folded = best.a * r.reshape(problem.P, problem.bo, 1)
    b_folded = best.b * c.reshape(problem.Q, 1, problem.bi)
    return PruneResult(
        method=method,
        core=best.core * best.mask,
        mask=best.mask,
        loss=best_loss,
        nowag_loss=history[0],
        n=problem.n,
        m=problem.m,
        a_blocks=a_folded,
        b_blocks=b_folded,
        block_size_out=problem.bo,
        block_size_in=problem.bi,
        history=history,
        raw_history=raw_history,
        iterations=iterations,
        stopped_early=stopped_early,
        extras=extras,
    )


@dataclass(frozen=True)
class FaithfulSettings(WrapperSettings):
    """The paper's schedule's options (:data:`~armor.solvers.options.FAITHFUL_OPTIONS`, where their defaults and
    meanings are), one value each; build it with :meth:`from_options`."""

    TABLE: ClassVar[tuple[Option, ...]] = FAITHFUL_OPTIONS
    OWNER: ClassVar[str] = "method 'armor'"

    iterations: int
    lr: float
    patience: int
    rtol: float
    seed: int


def armor_faithful(
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
    """The paper's schedule on the normalised weight ``wn`` from the NoWag-P ``mask``.

    Each iteration: one joint Adam step (``lr``) on ``A``, ``B`` and the kept core values, then one
    :func:`sparse_core_step` with groups sampled by the L1 norm of the core gradient (taken at the start of the
    iteration, i.e. one Adam step old, which saves a second backward pass).  Stops after ``iterations`` or when
    the best loss has not improved by a relative ``rtol`` for ``patience`` iterations (``patience=0`` never stops
    early).  Returns the best state seen.  ``callback(iteration, best_loss)`` is called every iteration.
    ``options``: :class:`FaithfulSettings` (wrapper blocks: ``block_size`` when given, else the largest within
    ``wrapper_budget``).
    """
    settings = FaithfulSettings.from_options(**options)
    bo, bi = settings.block_sizes(wn.shape[0], wn.shape[1], m)
    problem = ArmorProblem(wn, h, bo, bi, n, m)
    gen = torch.Generator(device=wn.device).manual_seed(settings.seed)
    state = problem.initial_state(mask)
    e = problem.residual(state)
    loss = problem.loss_of_residual(e)
    best, best_loss = state.clone(), loss
    history, raw_history = [loss], [loss]
    moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in (state.a, state.b, state.core)]
    stopper = _Stopper(loss, settings.patience, settings.rtol)
    stopped_early, it = False, 0
    t0 = time.perf_counter()
    for it in range(1, settings.iterations + 1):
        grad_a, grad_b, grad_core = problem.gradients(state, e)
        group_scores = grad_core.abs().reshape(problem.rows, problem.cols // m, m).sum(-1)
        grad_core.mul_(state.mask)  # pruned entries of W' get no gradient
        params = (state.a, state.b, state.core)
        for param, grad, (m1, m2) in zip(params, (grad_a, grad_b, grad_core), moments, strict=True):
            _adam_update(param, grad, m1, m2, it, settings.lr)
        state.core.mul_(state.mask)  # stale Adam moments must not revive pruned entries
        e = problem.residual(state)
        sparse_core_step(problem, state, e, group_scores, gen)
        loss = problem.loss_of_residual(e)
        raw_history.append(loss)
        if loss < best_loss:
            best_loss = loss
            best.copy_(state)
        history.append(best_loss)
        if callback is not None:
            callback(it, best_loss)
        if stopper.update(best_loss):
            stopped_early = True
            break
    extras = {
        "mode": "faithful",
        "lr": settings.lr,
        "seed": settings.seed,
        "solve_seconds": time.perf_counter() - t0,
        **settings.extras(),
    }
    return finish_result("armor", problem, best, best_loss, r, c, history, raw_history, it, stopped_early, extras)
