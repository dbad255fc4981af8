"""The per-layer maths: exact steps against brute force, the loss guarantee, masks and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

import armor
from armor.factors import (
    blockdiag_to_dense,
    budget_block_sizes,
    choose_block_size,
    normalize_weight,
    proxy_loss,
    resolve_block_sizes,
    wrapper_overhead,
)
from armor.solvers import baselines
from armor.solvers.armor import ArmorProblem, ArmorState, sparse_core_step
from armor.solvers.armor_blockhess import armor_blockhess
from armor.solvers.armor_fast import armor_fast, greedy_mask_step, group_gains, update_a, update_b, update_core_cg
from armor.sparsity import is_nm_mask, nm_mask_from_scores
from armor.stats import StatsAccumulator, diagonal_blocks


def random_spd_blocks(k, b, g):
    x = torch.randn(k, b, 3 * b, generator=g) + torch.randn(k, b, 1, generator=g)  # correlated features
    return x @ x.transpose(1, 2) / (3 * b)


def random_problem(rows=8, cols=16, bo=4, bi=8, seed=0, n=2, m=4, block_hessian=False):
    g = torch.Generator().manual_seed(seed)
    wn = torch.randn(rows, cols, generator=g)
    h = torch.rand(cols, generator=g) + 0.1
    h_blocks = random_spd_blocks(cols // bi, bi, g) if block_hessian else None
    prob = ArmorProblem(wn, h, bo, bi, n, m, h_blocks=h_blocks)
    mask = nm_mask_from_scores(torch.rand(rows, cols, generator=g), n, m)
    state = ArmorState(
        torch.eye(bo) + 0.3 * torch.randn(rows // bo, bo, bo, generator=g),
        torch.eye(bi) + 0.3 * torch.randn(cols // bi, bi, bi, generator=g),
        torch.randn(rows, cols, generator=g) * mask,
        mask,
    )
    return prob, state


def weight_root(prob: ArmorProblem) -> torch.Tensor:
    """A dense ``L`` with ``L L^T`` the loss weight (``diag(h)`` or ``blockdiag(H_q)``), float64."""
    if prob.h_blocks is None:
        return torch.diag(prob.h.double().sqrt())
    return blockdiag_to_dense(torch.linalg.cholesky(prob.h_blocks.double()))


def full_loss(prob: ArmorProblem, a, core, b) -> float:
    """The loss on the full matrices, ``||(A S B - Wn) L||^2 / ||Wn L||^2``, in float64."""
    w_hat = blockdiag_to_dense(a).double() @ core.double() @ blockdiag_to_dense(b).double()
    root = weight_root(prob)
    return float(((w_hat - prob.wn.double()) @ root).square().sum() / (prob.wn.double() @ root).square().sum())


def brute_force_group(prob, state, row, col0):
    """Best (support, values, loss) for one group by an explicit least-squares solve on the full matrices."""
    a_full, b_full = blockdiag_to_dense(state.a).double(), blockdiag_to_dense(state.b).double()
    root = weight_root(prob)
    base = state.core.double().clone()
    base[row, col0 : col0 + prob.m] = 0
    r0 = ((a_full @ base @ b_full - prob.wn.double()) @ root).reshape(-1)
    best = None
    for support in itertools.combinations(range(prob.m), prob.n):
        cols = []
        for k in support:
            unit = torch.zeros_like(base)
            unit[row, col0 + k] = 1
            cols.append(((a_full @ unit @ b_full) @ root).reshape(-1))
        design = torch.stack(cols, 1)
        v = torch.linalg.lstsq(design, -r0[:, None]).solution[:, 0]
        loss = float((r0 + design @ v).square().sum()) / prob.denominator
        if best is None or loss < best[2]:
            best = (support, v, loss)
    return best


@pytest.mark.parametrize("block_hessian", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_core_step_matches_brute_force(seed, block_hessian):
    prob, state = random_problem(seed=seed, block_hessian=block_hessian)
    before = state.clone()
    e = prob.residual(state)
    gpr = prob.bi // prob.m
    # one score per group, a different group wins in each tile
    scores = torch.rand(prob.rows, prob.cols // prob.m, generator=torch.Generator().manual_seed(seed + 10))
    change = sparse_core_step(prob, state, e, scores, greedy=True)
    loss_before = full_loss(prob, before.a, before.core, before.b)
    moved = 0
    for p, q in itertools.product(range(prob.P), range(prob.Q)):
        tile = scores[p * prob.bo : (p + 1) * prob.bo, q * gpr : (q + 1) * gpr]
        i, g = divmod(int(tile.argmax()), gpr)
        row, col0 = p * prob.bo + i, q * prob.bi + g * prob.m
        support, values, best_loss = brute_force_group(prob, before, row, col0)
        group = slice(col0, col0 + prob.m)
        if state.core[row, group].ne(before.core[row, group]).any():  # moved: to the brute-force optimum
            moved += 1
            assert tuple(state.mask[row, group].nonzero().squeeze(1).tolist()) == support
            torch.testing.assert_close(state.core[row, group][list(support)], values.float(), rtol=1e-3, atol=1e-4)
        else:  # kept: only when no support and values of this group do better
            assert best_loss >= loss_before - 1e-6 * loss_before
    assert moved > 0  # random factors: some tile's group can improve
    # the residual was updated consistently and the reported change is exact
    torch.testing.assert_close(e, prob.residual(state), rtol=1e-4, atol=1e-4)
    assert abs(full_loss(prob, state.a, state.core, state.b) - (loss_before + change)) < 1e-5
    assert change <= 1e-7


def test_sparse_core_step_single_tile_reaches_brute_force_optimum():
    prob, state = random_problem(rows=4, cols=8, bo=4, bi=8, seed=5)
    scores = torch.zeros(4, 2)
    scores[2, 1] = 1.0  # the only group: row 2, columns 4..7
    _, _, best_loss = brute_force_group(prob, state, 2, 4)
    sparse_core_step(prob, state, prob.residual(state), scores, greedy=True)
    assert abs(full_loss(prob, state.a, state.core, state.b) - best_loss) < 1e-5


@pytest.mark.parametrize("block_hessian", [False, True])
def test_group_gains_match_brute_force(block_hessian):
    prob, state = random_problem(seed=3, block_hessian=block_hessian)
    _, _, grad = prob.gradients(state, prob.residual(state))
    gains = group_gains(prob, state, grad)
    loss_now = full_loss(prob, state.a, state.core, state.b)
    for row, grp in [(0, 0), (3, 2), (5, 1), (7, 3)]:
        _, _, best = brute_force_group(prob, state, row, grp * prob.m)
        expected = max(loss_now - best, 0.0) * prob.denominator
        assert abs(float(gains[row, grp]) - expected) < 1e-3 * max(1.0, expected)


@pytest.mark.parametrize("block_hessian", [False, True])
def test_gradients_match_autograd(block_hessian):
    prob, state = random_problem(seed=4, block_hessian=block_hessian)
    a, b, core = (t.clone().requires_grad_() for t in (state.a, state.b, state.core))
    e = prob.reconstruct(ArmorState(a, b, core, state.mask)) - prob.wn
    root = weight_root(prob).float()
    loss = (e @ root).square().sum() / (prob.wn @ root).square().sum()
    loss.backward()
    ga, gb, gc = prob.gradients(state, prob.residual(state))
    for ours, ref in ((ga, a.grad), (gb, b.grad), (gc, core.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block_hessian", [False, True])
def test_exact_block_updates_are_stationary_and_monotone(block_hessian):
    prob, state = random_problem(rows=16, cols=32, bo=8, bi=16, seed=6, block_hessian=block_hessian)
    e = prob.residual(state)
    l0 = prob.loss_of_residual(e)
    e = update_a(prob, state, e, damping=1e-9)
    l1 = prob.loss_of_residual(e)
    ga, _, _ = prob.gradients(state, e)
    assert ga.abs().max() < 1e-4 and l1 <= l0
    e = update_b(prob, state, e, damping=1e-9)
    l2 = prob.loss_of_residual(e)
    _, gb, _ = prob.gradients(state, e)
    assert gb.abs().max() < 1e-4 and l2 <= l1
    e = update_core_cg(prob, state, e, steps=300)
    l3 = prob.loss_of_residual(e)
    assert l3 <= l2
    torch.testing.assert_close(e, prob.residual(state), rtol=1e-4, atol=1e-5)
    # CG reaches the exact least-squares optimum of the kept values (an explicit solve on the full matrices)
    a_full, b_full = blockdiag_to_dense(state.a).double(), blockdiag_to_dense(state.b).double()
    root = weight_root(prob)
    columns = []
    for i, j in state.mask.nonzero().tolist():
        unit = torch.zeros(prob.rows, prob.cols, dtype=torch.float64)
        unit[i, j] = 1
        columns.append(((a_full @ unit @ b_full) @ root).reshape(-1))
    design, target = torch.stack(columns, 1), (prob.wn.double() @ root).reshape(-1, 1)
    exact = torch.linalg.lstsq(design, target).solution
    optimum = float((design @ exact - target).square().sum()) / prob.denominator
    # float32 CG on a design of condition ~1e4: it must close most of the gap to the optimum, never pass it
    assert optimum - 1e-9 <= l3 <= optimum + 0.3 * (l2 - optimum) + 1e-9


def layer_case(kind: str, rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(512, cols, generator=g)
    if kind == "ill":  # correlated inputs, features spanning 12 orders of magnitude, wild row scales
        x = x @ torch.randn(cols, cols, generator=g) * torch.logspace(-6, 6, cols)
        w = w * torch.logspace(-3, 3, rows)[:, None]
    return w, armor.LayerStats.from_inputs(x, full=True)


@pytest.mark.parametrize("kind", ["random", "ill"])
@pytest.mark.parametrize("method", ["armor", "armor-fast"])
def test_armor_never_worse_than_nowag(kind, method):
    w, stats = layer_case(kind)
    opts = {"iterations": 60} if method == "armor" else {"sweeps": 6}
    res = armor.prune_layer(w, stats, method, block_size=32, **opts)
    nowag = armor.prune_layer(w, stats, "nowag")
    assert res.history[0] == pytest.approx(nowag.loss, rel=1e-5)
    assert res.loss <= res.nowag_loss
    assert res.loss == res.history[-1] == min(res.history)
    assert all(b <= a for a, b in zip(res.history, res.history[1:], strict=False))  # best-so-far never rises
    assert res.loss < 0.99 * res.nowag_loss  # and it actually improves
    # the reported loss is the loss of what is returned
    wn, r, c = normalize_weight(w)
    w_hat_n = res.dense_weight() / r[:, None] / c
    assert float(proxy_loss(w_hat_n, wn, stats.hessian_diag)) == pytest.approx(res.loss, rel=1e-3, abs=1e-7)


def test_faithful_keeps_best_state_when_adam_overshoots():
    w, stats = layer_case("random")
    res = armor.prune_layer(w, stats, "armor", block_size=32, iterations=40, lr=0.5)  # absurd lr: Adam diverges
    assert max(res.raw_history) > res.nowag_loss  # the iterate got worse ...
    assert res.loss <= res.nowag_loss  # ... the result did not


@pytest.mark.parametrize("method", armor.METHODS)
def test_every_method_gives_exact_nm_masks(method):
    w, stats = layer_case("random", rows=32, cols=64)
    res = armor.prune_layer(w, stats, method, **({"iterations": 5, "block_size": 16} if method == "armor" else {}))
    assert res.mask.dtype == torch.bool and is_nm_mask(res.mask, 2, 4)
    assert (res.core[~res.mask] == 0).all()
    assert res.dense_weight().shape == w.shape


def test_dense_weight_equals_folded_factors():
    w, stats = layer_case("random")
    res = armor.prune_layer(w, stats, "armor-fast", block_size=32, sweeps=3)
    a = blockdiag_to_dense(res.a_blocks)
    b = blockdiag_to_dense(res.b_blocks)
    torch.testing.assert_close(res.dense_weight(), a @ (res.core * res.mask) @ b, rtol=1e-4, atol=1e-5)
    assert res.block_size_out == 32 and res.block_size_in == 32


def direct_topk_mask(scores, n=2, m=4):
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            order = sorted(range(m), key=lambda k: (-float(scores[i, g + k]), k))
            for k in order[:n]:
                mask[i, g + k] = True
    return mask


def test_wanda_and_magnitude_masks_equal_direct_topk():
    w, stats = layer_case("random", rows=16, cols=32)
    w = w.round(decimals=1)  # force ties: they must break towards the lower index
    mag = armor.prune_layer(w, None, "magnitude")
    assert torch.equal(mag.mask, direct_topk_mask(w.abs()))
    wanda = armor.prune_layer(w, stats, "wanda")
    assert torch.equal(wanda.mask, direct_topk_mask(w.abs() * stats.hessian_diag.sqrt()))
    torch.testing.assert_close(wanda.core, w * wanda.mask)


def test_sparsegpt_beats_wanda_on_full_hessian_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g)
    x = torch.randn(2000, 8, generator=g) @ torch.randn(8, 96, generator=g) + 0.1 * torch.randn(2000, 96, generator=g)
    stats = armor.LayerStats.from_inputs(x, full=True)

    def err(w_hat):
        d = w - w_hat
        return float(torch.einsum("ij,jk,ik->", d, stats.hessian, d))

    sgpt = armor.prune_layer(w, stats, "sparsegpt")
    wanda = armor.prune_layer(w, stats, "wanda")
    assert err(sgpt.dense_weight()) < 0.8 * err(wanda.dense_weight())


def test_sparsegpt_needs_full_hessian():
    w, stats = layer_case("random", rows=8, cols=16)
    with pytest.raises(ValueError, match="full"):
        armor.prune_layer(w, stats.hessian_diag, "sparsegpt")


def test_bad_inputs_give_clear_errors():
    w = torch.randn(8, 18)
    with pytest.raises(ValueError, match=r"in_features=18 is not a multiple of 4"):
        armor.prune_layer(w, torch.ones(18), "nowag")
    with pytest.raises(ValueError, match="2-D"):
        armor.prune_layer(torch.randn(16), torch.ones(16), "nowag")
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        armor.prune_layer(torch.randn(8, 16), torch.ones(16), "obs")
    with pytest.raises(ValueError, match="statistics are for 12 input features but the weight has 16"):
        armor.prune_layer(torch.randn(8, 16), torch.ones(12), "nowag")
    with pytest.raises(ValueError, match="needs calibration statistics"):
        armor.prune_layer(torch.randn(8, 16), None, "wanda")
    with pytest.raises(ValueError, match="non-finite"):
        armor.prune_layer(torch.full((8, 16), float("nan")), torch.ones(16), "nowag")
    with pytest.raises(TypeError, match="itrations"):
        armor.prune_layer(torch.randn(8, 16), torch.ones(16), "armor-fast", itrations=3)


def test_bad_statistics_are_repaired_and_reported():
    w = torch.randn(16, 32)
    h = torch.rand(32) + 0.5
    h[3], h[7], h[9] = float("nan"), -1.0, 0.0
    res = armor.prune_layer(w, h, "armor-fast", block_size=16, sweeps=2)
    assert res.repaired_stats == 3
    assert res.loss <= res.nowag_loss and torch.isfinite(res.core).all()


def test_block_size_rule_and_smollm_shapes():
    assert choose_block_size(576, 128) == 96
    assert choose_block_size(1536, 128) == 128
    assert choose_block_size(11008, 128) == 128
    assert choose_block_size(20, 128, multiple_of=4) == 20
    with pytest.raises(ValueError, match="no block size"):
        choose_block_size(36, 16, multiple_of=8)
    w = torch.randn(192, 576)
    res = armor.prune_layer(w, torch.rand(576) + 0.1, "armor-fast", sweeps=1, block_size=128)
    assert (res.block_size_out, res.block_size_in) == (96, 96)
    assert res.extras["wrapper_overhead"] == pytest.approx(96 * (192 + 576) / (192 * 576))  # explicit: no budget
    assert "wrapper_budget" not in res.extras


def test_other_nm_patterns():
    w, stats = layer_case("random", rows=32, cols=64)
    for method in ("nowag", "armor-fast", "armor"):
        res = armor.prune_layer(w, stats, method, n=4, m=8, **({"iterations": 5} if method == "armor" else {}))
        assert is_nm_mask(res.mask, 4, 8) and res.loss <= res.nowag_loss + 1e-9


@pytest.mark.parametrize("method", ["armor", "armor-fast"])
def test_deterministic(method):
    w, stats = layer_case("random")
    opts = {"iterations": 20, "seed": 3} if method == "armor" else {"sweeps": 3}
    if method == "armor-fast":
        with pytest.raises(TypeError, match="seed"):  # no unused options: they would pollute resume fingerprints
            armor.prune_layer(w, stats, method, block_size=32, seed=0)
    r1 = armor.prune_layer(w, stats, method, block_size=32, **opts)
    r2 = armor.prune_layer(w, stats, method, block_size=32, **opts)
    assert r1.loss == r2.loss and torch.equal(r1.core, r2.core) and torch.equal(r1.mask, r2.mask)
    torch.testing.assert_close(r1.a_blocks, r2.a_blocks, rtol=0, atol=0)


def test_low_precision_weights_are_solved_in_float32():
    w, stats = layer_case("random", rows=32, cols=64)
    for dtype in (torch.float16, torch.bfloat16):
        res = armor.prune_layer(w.to(dtype), stats, "armor-fast", block_size=16, sweeps=2)
        assert res.core.dtype == torch.float32 and res.a_blocks.dtype == torch.float32
        assert res.loss <= res.nowag_loss


# -- budgeted block sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_budget_gives_128_on_llama2_7b_shapes(shape):
    assert budget_block_sizes(*shape) == (128, 128)
    assert resolve_block_sizes(*shape) == (128, 128)


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("budget", [0.03, 0.0625, 0.2])
def test_budget_keeps_every_smollm2_layer_within_budget(shape, budget):
    out_f, in_f = shape
    bo, bi = budget_block_sizes(out_f, in_f, budget)
    assert out_f % bo == 0 and in_f % bi == 0 and bi % 4 == 0 and max(bo, bi) <= 128
    assert wrapper_overhead(out_f, in_f, bo, bi) <= budget
    # maximal: no pair with a larger smaller side fits (brute force over all divisor pairs)
    fits = [
        min(o, i)
        for o in range(1, 129)
        for i in range(4, 129, 4)
        if out_f % o == 0 and in_f % i == 0 and wrapper_overhead(out_f, in_f, o, i) <= budget
    ]
    assert min(bo, bi) == max(fits)


def test_budget_default_on_smollm2_is_the_papers_share():
    assert budget_block_sizes(576, 576) == (18, 16)  # 5.9% of the dense values, not block 96's 33%
    assert budget_block_sizes(192, 576) == (12, 8)
    assert budget_block_sizes(1536, 576) == (24, 32)
    assert budget_block_sizes(576, 1536) == (32, 24)


def test_explicit_block_size_wins_over_budget_and_overhead_is_recorded():
    w, stats = layer_case("random", rows=64, cols=128)
    res = armor.prune_layer(w, stats, "armor-fast", block_size=32, wrapper_budget=0.01, sweeps=1)
    assert (res.block_size_out, res.block_size_in) == (32, 32)
    assert res.extras["wrapper_overhead"] == pytest.approx(32 * (64 + 128) / (64 * 128))
    res = armor.prune_layer(w, stats, "armor-fast", wrapper_budget=0.3, sweeps=1)
    bo, bi = budget_block_sizes(64, 128, 0.3)
    assert (res.block_size_out, res.block_size_in) == (bo, bi)
    assert res.extras["wrapper_budget"] == 0.3
    assert res.extras["wrapper_overhead"] == pytest.approx(wrapper_overhead(64, 128, bo, bi))
    assert res.extras["wrapper_overhead"] <= 0.3
    assert res.num_params()["wrappers"] == bo * 64 + bi * 128


@pytest.mark.parametrize("budget", [0.0, -0.1, float("nan"), float("inf"), "5%", True])
def test_bad_budget_gives_clear_error(budget):
    with pytest.raises(ValueError, match="wrapper budget must be a finite fraction > 0"):
        budget_block_sizes(576, 576, budget)


def test_too_small_budget_falls_back_to_the_smallest_blocks():
    assert budget_block_sizes(576, 576, 0.001) == (1, 4)
    assert budget_block_sizes(32, 64, m=8) == (1, 8)  # (32 + 8 * 64) / (32 * 64) = 27% > 6.25%
    w, stats = layer_case("random", rows=32, cols=64)
    res = armor.prune_layer(w, stats, "armor-fast", sweeps=1)
    assert (res.block_size_out, res.block_size_in) == (1, 4)
    assert res.extras["wrapper_overhead"] == pytest.approx((32 + 4 * 64) / (32 * 64))


# -- block-Hessian objective ----------------------------------------------------------------------------------


def test_stats_accumulator_and_diagonal_blocks_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 24, generator=g)
    acc = StatsAccumulator(24, full=True)
    acc.update(x[0])
    acc.update(x[1:])
    st = acc.finalize()
    h_ref = 2 * x.reshape(-1, 24).double().T @ x.reshape(-1, 24).double() / 150
    torch.testing.assert_close(st.hessian.double(), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.hessian_diag.double(), h_ref.diagonal(), rtol=1e-5, atol=1e-5)
    blocks = diagonal_blocks(8, st.hessian)
    assert blocks.shape == (3, 8, 8)
    for k in range(3):
        sl = slice(8 * k, 8 * k + 8)
        torch.testing.assert_close(blocks[k].double(), h_ref[sl, sl], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide the 24 input features"):
        diagonal_blocks(5, st.hessian)


@pytest.mark.parametrize("kind", ["random", "ill"])
def test_block_hessian_loss_never_rises_and_beats_nowag_under_its_objective(kind):
    w, stats = layer_case(kind)
    wn, r, c = normalize_weight(w)
    h = stats.hessian_diag
    mask = nm_mask_from_scores(baselines.nowag_scores(wn, h))
    res = armor_blockhess(wn, h, mask, r, c, hessian=stats.hessian, block_size=16, sweeps=6, patience=0)
    assert res.method == "armor-bh" and res.extras["objective"] == "block-hessian"
    # the starting point is NoWag-P, measured under the block-Hessian objective on the full matrices
    prob = ArmorProblem(wn, h, 16, 16, h_blocks=diagonal_blocks(16, stats.hessian))
    nowag_bh = full_loss(prob, torch.eye(16).expand(4, 16, 16), wn * mask, torch.eye(16).expand(8, 16, 16))
    assert res.history[0] == pytest.approx(nowag_bh, rel=1e-4)
    assert all(b <= a for a, b in zip(res.history, res.history[1:], strict=False))
    assert res.loss <= res.nowag_loss and res.loss < 0.99 * res.nowag_loss
    # the reported loss is the block-Hessian loss of what is returned
    a = res.a_blocks / r.reshape(4, 16, 1)
    b = res.b_blocks / c.reshape(8, 1, 16)
    assert full_loss(prob, a, res.core, b) == pytest.approx(res.loss, rel=1e-3, abs=1e-7)
    assert is_nm_mask(res.mask) and 0 < res.extras["diagonal_loss"] < 1
    with pytest.raises(ValueError, match="full"):
        armor_blockhess(wn, h, mask, r, c, hessian=diagonal_blocks(16, stats.hessian), block_size=16)


def test_block_hessian_with_diagonal_blocks_equals_the_papers_objective():
    w, stats = layer_case("random")
    wn, r, c = normalize_weight(w)
    h = stats.hessian_diag
    mask = nm_mask_from_scores(baselines.nowag_scores(wn, h))
    diag_only = torch.diag(h)
    bh = armor_blockhess(wn, h, mask, r, c, hessian=diag_only, block_size=16, sweeps=3, patience=0)
    paper = armor_fast(wn, h, mask, r, c, block_size=16, sweeps=3, patience=0)
    assert bh.loss == pytest.approx(paper.loss, rel=1e-4)
    assert bh.extras["diagonal_loss"] == pytest.approx(paper.loss, rel=1e-4)


@pytest.mark.parametrize("block_hessian", [False, True])
def test_greedy_mask_step_is_monotone_and_keeps_the_residual(block_hessian):
    prob, state = random_problem(rows=16, cols=32, bo=8, bi=16, seed=7, block_hessian=block_hessian)
    e = prob.residual(state)
    for _ in range(3):
        before = prob.loss_of_residual(e)
        e, change = greedy_mask_step(prob, state, e, per_tile=8)
        after = full_loss(prob, state.a, state.core, state.b)
        assert after <= before * (1 + 1e-6) and change <= 0  # float32 rounding of the tile sums only
        assert after == pytest.approx(before + change, rel=1e-5)
        torch.testing.assert_close(e, prob.residual(state), rtol=1e-4, atol=1e-5)
        assert is_nm_mask(state.mask) and (state.core[~state.mask] == 0).all()


def test_wrapper_budget_limit_follows_the_pattern():
    """Wrappers plus an n:m core must store fewer values than the dense layer: the budget's limit is 1 - n/m
    (0.5 at 2:4, 0.75 at 1:4, 0.33 at 2:3), and a budget is not checked when explicit blocks replace it."""
    from armor.factors import check_wrapper_budget

    check_wrapper_budget({"wrapper_budget": 0.6}, 1, 4)
    check_wrapper_budget({"wrapper_budget": 0.6, "block_size": 16}, 2, 4)
    check_wrapper_budget({"sweeps": 3}, 2, 4)  # a method without wrappers
    for budget, n, m in ((0.6, 2, 4), (0.5, 2, 4), (0.34, 2, 3), (0.8, 1, 4)):
        with pytest.raises(ValueError, match=f"wrapper_budget' {budget:g} leaves nothing saved at {n}:{m}"):
            check_wrapper_budget({"wrapper_budget": budget}, n, m)
