"""Tests of armor.runtime: packed storage, ArmorLinear / SparseLinear, save/load, backends (the packed CPU
kernels against the dense reconstruction), resident memory, bench helpers and ``armor bench``.

All PruneResults are built by hand (random wrappers, core and n:m mask) so that these tests do not depend on
the solvers and exercise arbitrary (not near-identity) wrappers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import armor.runtime.modules as runtime_modules
from armor import PruneResult
from armor.bench.layers import crossover, random_nm_result, run_layer_bench, storage_report
from armor.bench.models import model_resident_bytes
from armor.cli import build_parser
from armor.cli.bench_tables import format_crossover_table, format_layer_table
from armor.factors import block_product
from armor.runtime import (
    CPU_PACKED_MAX_TOKENS,
    ArmorLinear,
    SparseLinear,
    empty_module_from_spec,
    module_from_result,
    numba_available,
    pack_nm,
    state_nbytes,
    unpack_mask,
    unpack_nm,
)
from armor.runtime.packing import check_positions, packed_index_shape, unpack_indices
from armor.sparsity import is_nm_mask, nm_mask_from_scores
from conftest import make_tiny_model, pack_linears

needs_numba = pytest.mark.skipif(not numba_available(), reason="the packed CPU kernels need numba")

# (dtype, tolerance relative to the output scale): fp16 has a 10-bit mantissa, bf16 a 7-bit one.
DTYPE_TOL = [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)]


def _random_mask(out_f: int, in_f: int, n: int = 2, m: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nm_mask_from_scores(torch.rand(out_f, in_f, generator=g), n, m)


def _armor_result(out_f=96, in_f=128, bo=32, bi=16, n=2, m=4, seed=0) -> PruneResult:
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(out_f, in_f, n, m, seed)
    core = torch.randn(out_f, in_f, generator=g) * mask
    a = torch.randn(out_f // bo, bo, bo, generator=g) / bo**0.5
    b = torch.randn(in_f // bi, bi, bi, generator=g) / bi**0.5
    return PruneResult(
        "armor", core, mask, 0.1, 0.2, n=n, m=m, a_blocks=a, b_blocks=b, block_size_out=bo, block_size_in=bi
    )


def _sparse_result(out_f=96, in_f=128, n=2, m=4, seed=0) -> PruneResult:
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(out_f, in_f, n, m, seed)
    return PruneResult("wanda", torch.randn(out_f, in_f, generator=g) * mask, mask, 0.3, 0.2, n=n, m=m)


def _reference(result: PruneResult, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W_hat, bias)`` in float64 (x already rounded to the module dtype by the caller)."""
    return F.linear(x.double(), result.dense_weight().double(), None if bias is None else bias.double())


def _close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel} x {scale:.3e}"


# ----------------------------------------------------------------------------------------------------
# packing
# in_f=132 (2:4, 1:4) and 144 (3:16): the kept count per row is not a multiple of the entries per byte
@pytest.mark.parametrize(
    "n,m,in_f", [(2, 4, 64), (2, 4, 132), (4, 8, 64), (4, 8, 136), (1, 2, 66), (1, 4, 132), (3, 16, 144)]
)
def test_pack_unpack_round_trip_exact(n, m, in_f):
    out_f = 7
    mask = _random_mask(out_f, in_f, n, m, seed=in_f)
    core = torch.randn(out_f, in_f) * mask
    core[0, mask[0].nonzero()[0, 0]] = 0.0  # a kept entry that happens to be zero must survive too
    values, packed = pack_nm(core, mask, n, m)
    assert values.shape == (out_f, in_f * n // m)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == packed_index_shape(out_f, in_f, n, m)
    assert torch.equal(unpack_nm(values, packed, in_f, n, m), core)
    assert torch.equal(unpack_mask(packed, out_f, in_f, n, m), mask)


@pytest.mark.parametrize(
    "n,m,in_f", [(2, 4, 64), (2, 4, 132), (4, 8, 136), (1, 2, 66), (1, 4, 132), (3, 16, 144), (3, 6, 42)]
)
def test_check_positions_flags_exactly_the_groups_pack_nm_would_not_write(n, m, in_f):
    out_f, kept = 9, in_f * n // m
    _, packed = pack_nm(torch.randn(out_f, in_f), _random_mask(out_f, in_f, n, m, seed=in_f), n, m)
    check_positions(packed, kept, n, m)  # what pack_nm writes passes
    gen = torch.Generator().manual_seed(in_f)
    for _ in range(40):  # random bytes, judged against the unpacked positions
        noisy = torch.randint(0, 256, packed.shape, dtype=torch.uint8, generator=gen)
        noisy[: out_f - 1] = packed[: out_f - 1]  # the damage, if any, is in the last row
        groups = unpack_indices(noisy, kept, m).reshape(out_f, -1, n)
        bad = ((groups[..., 1:] <= groups[..., :-1]).any(-1) | (groups[..., -1] >= m)).nonzero()
        if len(bad) == 0:
            check_positions(noisy, kept, n, m)
            continue
        row, grp = (int(v) for v in bad[0])
        with pytest.raises(ValueError, match=rf"row {row}, columns {grp * m}\.\.{grp * m + m - 1}: stored positions"):
            check_positions(noisy, kept, n, m)


def test_pack_2_4_uses_two_bits_per_kept_value():
    mask = _random_mask(16, 4096)
    values, packed = pack_nm(torch.randn(16, 4096) * mask, mask)
    assert values.shape == (16, 2048)
    assert packed.shape == (16, 2048 // 4)  # 4 positions per byte


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_keeps_dtype(dtype):
    mask = _random_mask(8, 64)
    core = (torch.randn(8, 64) * mask).to(dtype)
    values, packed = pack_nm(core, mask)
    assert values.dtype == dtype
    assert torch.equal(unpack_nm(values, packed, 64), core)


def test_pack_rejects_non_nm_mask_with_clear_message():
    mask = _random_mask(4, 16)
    mask[2, 5] = ~mask[2, 5]  # group 1 of row 2 now keeps 1 or 3 entries
    with pytest.raises(ValueError, match=r"mask is not 2:4: row 2, columns 4\.\.7"):
        pack_nm(torch.randn(4, 16), mask)
    with pytest.raises(ValueError, match="multiple of m=4"):
        pack_nm(torch.randn(4, 10), torch.ones(4, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        pack_nm(torch.randn(4, 16), mask[:, :8])


def test_module_from_result_rejects_bad_mask():
    res = _sparse_result()
    res.mask = res.mask.clone()
    res.mask[0, :4] = True
    with pytest.raises(ValueError, match="not 2:4"):
        module_from_result(res, None)


# ----------------------------------------------------------------------------------------------------
# forward == dense reconstruction
@pytest.mark.parametrize("dtype,rel", DTYPE_TOL)
@pytest.mark.parametrize("backend", ["dense", pytest.param("packed", marks=needs_numba), "auto"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_armor_forward_matches_dense_reconstruction(dtype, rel, backend, with_bias):
    res = _armor_result()
    bias = torch.randn(96) if with_bias else None
    mod = module_from_result(res, bias, dtype, backend=backend)
    assert isinstance(mod, ArmorLinear)
    x = torch.randn(3, 5, 128).to(dtype)
    with torch.no_grad():
        y = mod(x)
    assert y.shape == (3, 5, 96) and y.dtype == dtype
    assert mod.active_backend == (backend if backend != "auto" else mod.backend_for(15))
    ref = _reference(res, x, None if bias is None else bias.to(dtype))
    _close(y, ref, rel)


def test_armor_orientation_against_block_product():
    # Non-symmetric blocks and different in/out block sizes: any transposition mistake shows up here.
    res = _armor_result(out_f=64, in_f=96, bo=16, bi=32, seed=3)
    mod = module_from_result(res, None, torch.float64, backend="dense")
    w_hat = block_product(res.a_blocks.double(), (res.core * res.mask).double(), res.b_blocks.double())
    x = torch.randn(11, 96, dtype=torch.float64)
    torch.testing.assert_close(mod(x), x @ w_hat.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mod.dense_weight(), w_hat, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,rel", DTYPE_TOL)
def test_sparse_forward_matches_dense(dtype, rel):
    res = _sparse_result()
    bias = torch.randn(96)
    mod = module_from_result(res, bias, dtype)
    assert isinstance(mod, SparseLinear)
    x = torch.randn(4, 128).to(dtype)
    ref = _reference(res, x, bias.to(dtype))
    _close(mod(x), ref, rel)
    assert torch.equal(mod.dense_weight(), (res.core * res.mask).to(dtype))


def test_4_8_pattern_modules():
    res = _armor_result(n=4, m=8, seed=5)
    mod = module_from_result(res, None, torch.float32, backend="dense")
    x = torch.randn(6, 128)
    _close(mod(x), _reference(res, x, None), 1e-5)
    sp = module_from_result(_sparse_result(n=4, m=8), None)
    assert sp.spec()["n"] == 4 and sp.spec()["m"] == 8


def test_no_weight_attribute_and_no_dense_parameter():
    mod = module_from_result(_armor_result(), torch.randn(96), torch.float16)
    names = dict(mod.named_parameters()) | dict(mod.named_buffers())
    assert "weight" not in names
    assert set(mod.state_dict()) == {"values", "indices", "a_blocks", "b_blocks", "bias"}
    assert getattr(mod, "weight", None) is None  # nothing dense is built behind a getattr
    w = mod.dense_weight()  # built only on purpose
    assert w.shape == (96, 128) and w.dtype == torch.float16 and w.device.type == "cpu"
    assert mod.in_features == 128 and mod.out_features == 96


@needs_numba
def test_transformers_generate_and_save_never_build_a_dense_matrix(tmp_path, monkeypatch):
    """A Llama whose every decoder linear is packed (ARMOR and plain 2:4) generates and saves through
    transformers with every way of building a dense core or W_hat made to fail."""
    pytest.importorskip("transformers")
    import armor.runtime.modules as modules

    model = make_tiny_model(64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                            max_position_embeddings=64, tie=False)  # fmt: skip
    names = pack_linears(model, 16, backend="packed")
    ids = torch.randint(0, 64, (1, 5))
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense matrix was built")

    for target, attr in [
        (modules._PackedNMLinear, "_dense_core"), (modules.SparseLinear, "dense_weight"),
        (modules.ArmorLinear, "dense_weight"), (modules.ArmorLinear, "_reconstruct"), (modules, "unpack_nm"),
        (modules, "unpack_dense"),
    ]:  # fmt: skip
        monkeypatch.setattr(target, attr, forbidden)
    with pytest.raises(AssertionError, match="dense matrix"):  # the trap is live
        model.get_submodule(names[0]).dense_weight()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert any(tmp_path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------
# state_dict -> safetensors -> spec -> load
@pytest.mark.parametrize("kind", ["armor", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_round_trip(tmp_path, kind, dtype):
    res = _armor_result() if kind == "armor" else _sparse_result()
    mod = module_from_result(res, torch.randn(96), dtype)
    spec = mod.spec()
    assert spec["type"] == kind
    spec = json.loads(json.dumps(spec))  # JSON-able
    path = tmp_path / "layer.safetensors"
    save_file(mod.state_dict(), str(path))
    loaded = load_file(str(path))
    assert loaded["indices"].dtype == torch.uint8 and loaded["values"].dtype == dtype

    mod2 = empty_module_from_spec(spec, dtype=dtype, device="cpu")
    assert type(mod2) is type(mod)
    mod2.load_state_dict(loaded)
    x = torch.randn(2, 7, 128).to(dtype)
    assert torch.equal(mod2(x), mod(x))
    assert mod2.spec() == mod.spec()
    # the file holds the packed state only: half the values, 2 bits per position, the blocks, the bias
    elem = torch.empty((), dtype=dtype).element_size()
    expected = 96 * 64 * elem + 96 * 16 + 96 * elem + (96 * 32 + 128 * 16) * elem * (kind == "armor")
    assert state_nbytes(mod) == expected
    assert expected < path.stat().st_size < expected + 1024  # + the JSON header


def test_spec_keys():
    a = module_from_result(_armor_result(), None).spec()
    s = module_from_result(_sparse_result(), torch.randn(96)).spec()
    keys = {"type", "in_features", "out_features", "n", "m", "bias", "block_size_out", "block_size_in"}
    assert set(a) == keys and set(s) == keys
    assert a["block_size_out"] == 32 and a["block_size_in"] == 16 and a["bias"] is False
    assert s["block_size_out"] is None and s["block_size_in"] is None and s["bias"] is True
    with pytest.raises(ValueError, match="unknown module type"):
        empty_module_from_spec({**s, "type": "dense"})


@pytest.mark.parametrize("backend", ["dense", pytest.param("packed", marks=needs_numba)])
def test_forward_follows_state_changes(backend):
    src = module_from_result(_armor_result(), None, torch.float32, backend=backend)
    mod = empty_module_from_spec(src.spec(), dtype=torch.float32, backend=backend)
    mod.load_state_dict(src.state_dict())
    x = torch.randn(3, 128)
    torch.testing.assert_close(mod(x), src(x))
    # A later load must be seen by the next forward (no stale derived state) ...
    other = module_from_result(_armor_result(seed=9), None, torch.float32)
    mod.load_state_dict(other.state_dict())
    torch.testing.assert_close(mod(x), other(x), rtol=1e-5, atol=1e-5)
    # ... and so must an in-place edit of the values.
    with torch.no_grad():
        mod.values.mul_(2.0)
    torch.testing.assert_close(mod(x), 2 * other(x), rtol=1e-5, atol=1e-5)


def test_dtype_conversion_of_module():
    res = _armor_result()
    bias = torch.randn(96)
    mod = module_from_result(res, bias, torch.float32)
    x = torch.randn(4, 128)
    mod(x)
    mod = mod.to(torch.bfloat16)
    assert mod.values.dtype == torch.bfloat16 and mod.indices.dtype == torch.uint8
    xb = x.bfloat16()
    y = mod(xb)
    assert y.dtype == torch.bfloat16
    # the float32 state rounded to bfloat16 once: the bfloat16 reconstruction is the reference
    ref = F.linear(xb.double(), mod.dense_weight().double(), bias.bfloat16().double())
    _close(y, ref, 3e-2)


def test_gradients_take_the_dense_path():
    res = _sparse_result()
    mod = module_from_result(res, None)
    x = torch.randn(2, 128)
    with torch.inference_mode():
        y = mod(x)
    x.requires_grad_(True)
    out = mod(x)
    assert mod.active_backend == "dense"  # the only differentiable path
    (out * torch.arange(96.0)).sum().backward()
    torch.testing.assert_close(out.detach(), y, rtol=1e-5, atol=1e-5)
    # d/dx sum_o c_o (W x)_o = W^T c
    expected = (res.core * res.mask).T @ torch.arange(96.0)
    torch.testing.assert_close(x.grad, expected.expand(2, -1), rtol=1e-5, atol=1e-5)


def test_an_input_of_another_dtype_gives_one_result_on_every_path():
    """A float32 input to a bfloat16 module. Before: the packed path (auto up to CPU_PACKED_MAX_TOKENS tokens) took
    it, the dense path raised 'mat1 and mat2 must have the same dtype', so the same call worked at 16 tokens and
    failed at 17. Now every path reads it in the module's dtype, differentiably."""
    limit = CPU_PACKED_MAX_TOKENS[torch.bfloat16]
    x = torch.randn(limit + 1, 128)
    for res in (_armor_result(), _sparse_result()):
        for backend in ("auto", "packed", "dense"):
            mod = module_from_result(res, torch.randn(96), torch.bfloat16, backend=backend)
            for rows in (x[:3], x):
                want = mod(rows.to(torch.bfloat16))
                got = mod(rows)
                assert got.dtype == torch.bfloat16 and torch.equal(got, want), (backend, len(rows))
            xg = x[:3].clone().requires_grad_(True)
            mod(xg).float().sum().backward()
            assert xg.grad.dtype == torch.float32 and xg.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# backends
def test_backends_on_cpu():
    mod = module_from_result(_armor_result(), None, torch.float16)
    assert mod.backend == "auto"
    limit = CPU_PACKED_MAX_TOKENS[torch.float16]
    if numba_available():
        assert mod.backend_for(1) == "packed" and mod.backend_for(limit) == "packed"
        assert mod.backend_for(limit + 1) == "dense"
        assert mod.active_backend == "packed"  # before any forward: what one token takes
    else:
        assert mod.backend_for(1) == "dense"
    mod(torch.randn(limit + 1, 128, dtype=torch.float16))
    assert mod.active_backend == "dense"  # after a forward: what that forward took
    mod.backend = "dense"
    assert mod.active_backend == "dense" and mod.backend_for(1) == "dense"
    sp = module_from_result(_sparse_result(), None, torch.float16, backend="dense")
    assert sp.active_backend == "dense"
    with pytest.raises(ValueError, match="unknown backend 'folded'"):
        sp.backend = "folded"  # the resident folded W_hat is gone
    with pytest.raises(ValueError, match="unknown backend"):
        mod.backend = "gather"


def test_without_numba_auto_is_dense_and_packed_says_why(monkeypatch):
    monkeypatch.setattr(runtime_modules, "numba_available", lambda: False)
    res = _armor_result()
    mod = module_from_result(res, None, torch.float32)
    x = torch.randn(1, 128)
    _close(mod(x), _reference(res, x, None), 1e-5)
    assert mod.active_backend == "dense"
    forced = module_from_result(res, None, torch.float32, backend="packed")
    with pytest.raises(RuntimeError, match="'packed' was forced.*numba"):
        forced(x)


@needs_numba
def test_packed_rejects_what_it_cannot_run():
    mod = module_from_result(_sparse_result(), None, torch.float64, backend="packed")
    with pytest.raises(RuntimeError, match="'packed' was forced.*float32, bfloat16 and float16"):
        mod(torch.randn(2, 128, dtype=torch.float64))


@pytest.mark.parametrize("make", [_armor_result, _sparse_result])
def test_forcing_semi_structured_on_cpu_raises(make):
    mod = module_from_result(make(), None, torch.float16, backend="semi_structured")
    with pytest.raises(RuntimeError, match="semi_structured.*CUDA"):
        mod(torch.randn(2, 128, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="CUDA"):
        _ = mod.active_backend


# ----------------------------------------------------------------------------------------------------
# the packed CPU kernels == the dense reconstruction
def _run_packed(mod, x):
    with torch.no_grad():
        y = mod(x)
    assert mod.active_backend == "packed"
    return y


# (n, m, out, in): in=136 -> 68 kept per row, not a multiple of the 16-entry vector step (scalar tail);
# out=99 is not a multiple of the 4-row groups (row tail); 4:8 and 1:4 take the generic loop.
KERNEL_SHAPES = [(2, 4, 96, 128), (2, 4, 99, 136), (4, 8, 40, 64), (1, 4, 12, 32)]


@needs_numba
@pytest.mark.parametrize("n,m,out_f,in_f", KERNEL_SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_packed_sparse_equals_dense_reconstruction(n, m, out_f, in_f, tokens, dtype, rel):
    res = _sparse_result(out_f, in_f, n, m, seed=tokens)
    bias = torch.randn(out_f)
    mod = module_from_result(res, bias, dtype, backend="packed")
    x = torch.randn(tokens, in_f).to(dtype)
    y = _run_packed(mod, x)
    assert y.shape == (tokens, out_f) and y.dtype == dtype
    # reference: the STORED (dtype-rounded) weight and bias in float64; the kernel sums in float32 and rounds
    # once, so fp32 differs by summation order only and 16-bit by one rounding of the output
    ref = F.linear(x.double(), mod.dense_weight().double(), mod.bias.double())
    _close(y, ref, rel)


@needs_numba
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_packed_fp32_is_exact_up_to_summation_order(tokens):
    # kept values and inputs that are small integers: every product and partial sum is exact in float32,
    # so any order of summation gives the exact result
    g = torch.Generator().manual_seed(tokens)
    mask = _random_mask(64, 96, seed=tokens)
    core = torch.randint(-8, 9, (64, 96), generator=g).float() * mask
    res = PruneResult("wanda", core, mask, 0.0, 0.0)
    mod = module_from_result(res, None, torch.float32, backend="packed")
    x = torch.randint(-8, 9, (tokens, 96), generator=g).float()
    assert torch.equal(_run_packed(mod, x), x @ core.T)


@needs_numba
@pytest.mark.parametrize("make", [_armor_result, _sparse_result])
def test_packed_one_thread_and_two_threads_agree(make, monkeypatch):
    """One torch thread runs the serial kernels (no numba thread pool); more threads split the rows over numba's
    pool, but only for calls with at least CPU_PARALLEL_MIN_WORK kept values x passes: a smaller call stays
    serial, since a fork/join costs it more than the second thread gives."""
    import armor.runtime.kernels as kernels

    res = make()
    mod = module_from_result(res, None, torch.float32, backend="packed")
    x = torch.randn(5, 128)
    ran: list[str] = []
    for name in ("ARMOR", "SPARSE"):
        serial, parallel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, (lambda *a, f=serial: ran.append("serial") or f(*a),
                                            lambda *a, f=parallel: ran.append("parallel") or f(*a)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = _run_packed(mod, x)
        torch.set_num_threads(2)
        _run_packed(mod, x)  # 64 rows: too small to split
        monkeypatch.setattr(kernels, "CPU_PARALLEL_MIN_WORK", 1)
        y2 = _run_packed(mod, x)
    finally:
        torch.set_num_threads(before)
    assert ran == ["serial", "serial", "parallel"]
    assert torch.equal(y1, y2)  # each output is summed by one thread in the same order either way
    _close(y1, _reference(res, x, None), 1e-5)


@needs_numba
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_packed_non_contiguous_inputs(layout):
    res = _sparse_result()
    mod = module_from_result(res, None, torch.float32, backend="packed")
    base = torch.randn(128, 5)
    x = {
        "transposed": base.T,  # (5, 128), column-major
        "strided": torch.randn(5, 256)[:, ::2],
        "expanded": torch.randn(1, 128).expand(5, 128),
    }[layout]
    assert not x.is_contiguous()
    _close(_run_packed(mod, x), _reference(res, x, None), 1e-5)


@needs_numba
@pytest.mark.parametrize(
    "bo,bi,out_f,in_f", [(48, 16, 96, 128), (12, 40, 96, 120), (96, 128, 96, 128), (10, 12, 30, 36)]
)
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_packed_armor_ragged_blocks_equal_dense_reconstruction(bo, bi, out_f, in_f, tokens, dtype, rel):
    # block sizes that differ between in and out, are not 128 and (120 / 40, 36) give a kept count per row that
    # is not a multiple of the vector step; 10 output rows per block of A' are not a multiple of the 4 rows that
    # the 2:4 kernel takes per step
    res = _armor_result(out_f, in_f, bo, bi, seed=bo + bi)
    bias = torch.randn(out_f)
    mod = module_from_result(res, bias, dtype, backend="packed")
    x = torch.randn(2, tokens, in_f).to(dtype)
    y = _run_packed(mod, x)
    assert y.shape == (2, tokens, out_f) and y.dtype == dtype
    ref = F.linear(x.double(), mod.dense_weight().double(), mod.bias.double())
    if dtype == torch.float32:
        _close(y, ref, rel)
    else:
        # the stored 16-bit blocks and core multiplied in float32 (one output rounding) against the product
        # of the same stored factors in float64
        w = block_product(mod.a_blocks.double(), unpack_nm(mod.values, mod.indices, in_f).double(),
                          mod.b_blocks.double())
        _close(y, F.linear(x.double(), w, mod.bias.double()), rel)


@needs_numba
def test_packed_forward_builds_no_dense_matrix(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a dense matrix was built in the packed forward")

    monkeypatch.setattr(runtime_modules, "unpack_nm", forbidden)
    monkeypatch.setattr(runtime_modules, "block_product", forbidden)
    for res in (_armor_result(), _sparse_result()):
        mod = module_from_result(res, None, torch.float32, backend="packed")
        x = torch.randn(3, 128)
        _close(_run_packed(mod, x), _reference(res, x, None), 1e-5)


def _tensors_held(mod) -> list[torch.Tensor]:
    """Every tensor reachable from the module's attributes and caches (not only its registered state)."""
    found = [t for t in mod.state_dict().values()]
    for value in vars(mod).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                for part in item if isinstance(item, tuple) else (item,):
                    if isinstance(part, torch.Tensor):
                        found.append(part)
    return found


@pytest.mark.parametrize("backend", ["auto", "dense", pytest.param("packed", marks=needs_numba)])
@pytest.mark.parametrize("make", [_armor_result, _sparse_result])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_resident_dense_copy_after_forward(backend, make, dtype):
    mod = module_from_result(make(), torch.randn(96), dtype, backend=backend)
    stored = mod.stored_nbytes()
    for tokens in (1, 3, 200):  # decode-sized and prefill-sized batches (auto switches to dense)
        with torch.no_grad():
            mod(torch.randn(tokens, 128).to(dtype))
        assert mod.cache_nbytes() == 0
        assert mod.resident_nbytes() == stored
        held = _tensors_held(mod)
        assert not any(t.numel() >= 96 * 128 for t in held), [tuple(t.shape) for t in held]
    # and what it holds is at most the packed state: 2:4 fp32/bf16 core = 0.5625x dense, plus wrappers and bias
    elem = torch.empty((), dtype=dtype).element_size()
    core = 96 * 64 * elem + 96 * 16
    wrappers = (96 * 32 + 128 * 16) * elem if make is _armor_result else 0
    assert mod.resident_nbytes() == core + wrappers + 96 * elem


def test_model_resident_bytes_counts_tied_weights_once():
    lin = torch.nn.Linear(8, 8, bias=False)
    model = torch.nn.Sequential(lin, torch.nn.Linear(8, 8, bias=False))
    model[1].weight = lin.weight  # tied
    assert model_resident_bytes(model) == 8 * 8 * 4
    packed = module_from_result(_sparse_result(), torch.randn(96))
    assert model_resident_bytes(torch.nn.Sequential(packed)) == packed.stored_nbytes()


# ----------------------------------------------------------------------------------------------------
# bench helpers (tiny sizes)
def test_run_layer_bench_small():
    backends = ("packed", "dense") if numba_available() else ("dense",)
    recs = run_layer_bench(
        [(64, 128)], [1, 4], torch.float32, "cpu", repeats=3, warmup=1, block_size=32, backends=backends
    )
    keys = {(r["method"], r["backend"]) for r in recs}
    assert keys == {("dense", "F.linear")} | {(m, b) for m in ("sparse-2:4", "armor-b32") for b in backends}
    assert len(recs) == 2 * len(keys)
    by = {(r["method"], r["backend"], r["batch"]): r for r in recs}
    for r in recs:
        dense = by[("dense", "F.linear", r["batch"])]
        assert r["speedup_vs_dense"] == pytest.approx(dense["median_s"] / r["median_s"])
        assert r["min_speedup_vs_dense"] == pytest.approx(dense["min_s"] / r["min_s"])
        assert r["min_s"] <= r["median_s"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["median_s"])
        assert r["active_backend"] == r["backend"] or r["method"] == "dense"
        # nothing is cached on CPU: what a module keeps is what it stores
        assert r["resident_bytes"] == r["stored_bytes"]
        assert r["resident_vs_dense"] == pytest.approx(r["resident_bytes"] / (64 * 128 * 4))
    assert by[("dense", "F.linear", 1)]["stored_bytes"] == 64 * 128 * 4
    assert by[("sparse-2:4", "dense", 1)]["stored_bytes"] == 64 * 64 * 4 + 64 * 16
    assert by[("armor-b32", "dense", 4)]["stored_bytes"] == 64 * 64 * 4 + 64 * 16 + (64 + 128) * 32 * 4
    table = format_layer_table(recs)
    assert "| float32 | 64x128 | 4 | armor-b32 | dense | " in table
    assert len(table.splitlines()) == 2 + len(recs)


@pytest.mark.parametrize("timing", ["kernels", "graph"])
def test_kernel_and_graph_timing_need_cuda(timing):
    with pytest.raises(ValueError, match=f"{timing} timing needs a CUDA device"):
        run_layer_bench([(8, 16)], [1], torch.float32, "cpu", repeats=1, warmup=1, block_size=4, timing=timing)


def _fake_record(method, backend, batch, speedup):
    return {"dtype": "float32", "shape": "8x8", "method": method, "backend": backend, "batch": batch,
            "speedup_vs_dense": speedup}


def test_crossover_is_the_batch_from_which_dense_always_wins():
    recs = [
        _fake_record("dense", "F.linear", b, 1.0) for b in (1, 4, 16, 64)
    ] + [
        _fake_record("sparse-2:4", "packed", 1, 1.8),
        _fake_record("sparse-2:4", "packed", 4, 0.9),  # a noisy loss below a later win does not count
        _fake_record("sparse-2:4", "packed", 16, 1.1),
        _fake_record("sparse-2:4", "packed", 64, 0.5),
        _fake_record("armor-b8", "packed", 1, 1.4),
        _fake_record("armor-b8", "packed", 4, 1.2),
        _fake_record("armor-b8", "packed", 16, 1.01),
        _fake_record("armor-b8", "packed", 64, 1.3),
        _fake_record("armor-b8", "dense", 1, 0.9),
        _fake_record("armor-b8", "dense", 4, 1.0),
        _fake_record("armor-b8", "dense", 16, 0.8),
        _fake_record("armor-b8", "dense", 64, 0.7),
    ]
    rows = {(r["method"], r["backend"]): r for r in crossover(recs)}
    assert set(rows) == {("sparse-2:4", "packed"), ("armor-b8", "packed"), ("armor-b8", "dense")}
    assert rows[("sparse-2:4", "packed")]["dense_wins_from"] == 64
    assert rows[("armor-b8", "packed")]["dense_wins_from"] is None
    assert rows[("armor-b8", "dense")]["dense_wins_from"] == 1
    assert rows[("sparse-2:4", "packed")]["speedups"] == {1: 1.8, 4: 0.9, 16: 1.1, 64: 0.5}
    table = format_crossover_table(list(rows.values()))
    assert "| float32 | 8x8 | armor-b8 | packed | 1: 1.40x, 4: 1.20x, 16: 1.01x, 64: 1.30x | > 64 |" in table


def test_storage_report_small_stack_and_ratio():
    rep = storage_report({(256, 256): 2, (512, 256): 1}, block_size=32)
    dense = (256 * 256 * 2 + 512 * 256) * 2
    assert rep["total_bytes"]["dense"] == dense
    # fp16 values (half the entries) + 2-bit positions = 0.5625 of dense, plus fp16 wrapper blocks
    assert rep["total_bytes"]["sparse"] == dense * 0.5625
    wrappers = 2 * (256 * 32 * 2) * 2 + (512 * 32 + 256 * 32) * 2
    assert rep["total_bytes"]["armor"] == dense * 0.5625 + wrappers


def test_random_nm_result_is_valid():
    res = random_nm_result(32, 64, block_size=16)
    assert is_nm_mask(res.mask) and res.has_wrappers and res.a_blocks.shape == (2, 16, 16)


def test_armor_bench_cli_layers(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = build_parser().parse_args(
        ["bench", "--shapes", "64x128", "--batches", "1,3", "--dtype", "float32,bfloat16", "--repeats", "1",
         "--warmup", "1", "--block-size", "32", "--backends", "dense", "--no-storage", "--json", str(out)]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| float32 | 64x128 | 1 | armor-b32 | dense | " in text
    assert "| bfloat16 | 64x128 | 3 | sparse-2:4 | dense | " in text
    assert "dense wins from batch" in text and "Storage (" not in text
    layers = json.loads(out.read_text())["layers"]
    # 2 dtypes x 2 batches x (dense + 2 pruned layers on one backend)
    assert len(layers) == 12 and {r["dtype"] for r in layers} == {"float32", "bfloat16"}


@pytest.mark.slow  # packs one real layer per Llama-2-7B shape (~15 s)
def test_armor_bench_cli_storage_only(capsys):
    args = build_parser().parse_args(["bench", "--storage-only", "--dtype", "float16"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| **total** | | 12.06 GiB | 6.79 GiB (0.5625) |" in text
    assert "| float" not in text  # no layer timings


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shapes", "64by128"], "bad shape"),
        (["--batches", "1,0"], "positive integers"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--backends", "folded"], "unknown backend"),
        # before: "cannot reshape tensor of 0 elements" / "shape '[64, 63]' is invalid for input of size 3840"
        (["--shapes", "0x64"], "bad shape '0x64': OUT and IN must be positive and IN a multiple of 4"),
        (["--shapes", "64x128,64x63"], "bad shape '64x63'"),
    ],
)
def test_armor_bench_cli_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", *argv])
    assert message in capsys.readouterr().err


def test_armor_bench_block_size_that_does_not_tile_is_an_error_naming_it(capsys):
    """Before: 'wrapper blocks (9, 7, 7) / (9, 7, 7) do not tile a core of shape (64, 64)', after the header, with
    no word of --block-size (and the storage report's 7B shapes likewise)."""
    from conftest import run_cli

    rc, out, err = run_cli(capsys, "bench", "--shapes", "64x128", "--batches", "1", "--block-size", "24",
                           "--no-storage")
    assert rc == 2 and "--block-size 24 does not tile the shapes 64x128" in err and "armor runtime bench" not in out
    rc, _, err = run_cli(capsys, "bench", "--storage-only", "--block-size", "7")
    assert rc == 2 and "--block-size 7 does not tile the shapes 4096x4096, 11008x4096, 4096x11008" in err


def test_model_timing_helpers():
    transformers = pytest.importorskip("transformers")
    from armor.bench.models import time_generation, time_prefill

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    # swap one linear for an ARMOR layer to check the helpers run through our modules too
    lin = model.model.layers[0].mlp.up_proj
    mask = _random_mask(64, 32)
    res = PruneResult(
        "armor",
        lin.weight.detach() * mask,
        mask,
        0.0,
        0.0,
        a_blocks=torch.eye(16).repeat(4, 1, 1),
        b_blocks=torch.eye(16).repeat(2, 1, 1),
        block_size_out=16,
        block_size_in=16,
    )
    model.model.layers[0].mlp.up_proj = module_from_result(res, None)
    ids = torch.randint(0, 64, (2, 8))
    pre = time_prefill(model, ids, repeats=1, warmup=0)
    assert pre["prompt_tokens"] == 8 and pre["tokens_per_s"] > 0
    gen = time_generation(model, ids, new_tokens=4, repeats=1, warmup=0)
    assert gen["new_tokens"] == 4 and gen["tokens_per_s"] > 0 and gen["decode_tokens_per_s"] > 0
    one = time_generation(model, ids, new_tokens=1, repeats=1, warmup=0)  # the prompt's token only: no decode step
    assert one["new_tokens"] == 1 and one["decode_tokens_per_s"] is None  # before: 0.0, shown as "0.00" tokens/s


@pytest.mark.parametrize("kind", ["armor", "sparse"])
def test_load_state_dict_assign_keeps_frozen_parameters(kind):
    # armor.model.io loads with assign=True: parameters are replaced, not copied into.
    src = module_from_result(
        _armor_result() if kind == "armor" else _sparse_result(), torch.randn(96), torch.float16
    )
    mod = empty_module_from_spec(src.spec(), dtype=torch.float16)
    x = torch.randn(3, 128, dtype=torch.float16)
    mod(x)  # a cache of the zero state must not survive the load
    mod.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, strict=True, assign=True)
    assert isinstance(mod.values, torch.nn.Parameter) and not mod.values.requires_grad
    assert mod.indices.dtype == torch.uint8
    assert torch.equal(mod(x), src(x))
    assert sum(p.numel() for p in mod.parameters()) == sum(p.numel() for p in src.parameters())


def test_greedy_decode_with_a_static_cache_equals_generate():
    """The decode loop that CUDA graphs capture (armor.runtime.graphs), run eagerly on CPU through packed
    layers: the same tokens as ``model.generate``; capture is refused off CUDA."""
    pytest.importorskip("transformers")
    from armor.runtime.graphs import greedy_decode

    model = make_tiny_model(64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64, tie=False)  # fmt: skip
    model.generation_config.eos_token_id = None  # generate must not stop early
    pack_linears(model, 16, names=["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"])
    ids = torch.randint(0, 64, (3, 5))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = greedy_decode(model, ids, 6)
    assert out.shape == (3, 11) and torch.equal(out, ref)
    with pytest.raises(ValueError, match="CUDA"):
        greedy_decode(model, ids, 3, capture=True)


def test_each_step_writes_at_the_callers_position_whatever_ran_before():
    """transformers 5's static layers write where their own counter says, and every forward advances it (a
    capture's warm-ups too).  The step sets every counter to ``position`` first: extra calls and a counter
    knocked off by hand change nothing, and the decode still gives ``generate``'s tokens."""
    pytest.importorskip("transformers")
    from armor.runtime.graphs import cache_counters, start_decoding

    model = make_tiny_model(64)
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, 64, (2, 5))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        step, token, position = start_decoding(model, ids, 4, capture=False)
        cache = next(c.cell_contents for c in step.__closure__ if type(c.cell_contents).__name__ == "StaticCache")
        counters = cache_counters(cache)
        assert len(counters) == 2 and all(int(c) == 5 for c in counters)
        step(), step()  # what a capture's warm-ups do: two forwards at the same position
        assert all(int(c) == 6 for c in counters)  # counter = position + 1, not 7
        tokens = [token.clone()]
        for i in range(3):
            counters[i % 2].add_(3)  # a drifted counter is put back by the next step
            token.copy_(step().argmax(-1, keepdim=True))
            tokens.append(token.clone())
            position += 1
    assert torch.equal(torch.cat([ids, *tokens], dim=1), ref)
    assert all(int(c) == 8 for c in counters)


def test_capture_is_refused_for_a_window_that_fills_up():
    """A graph replays the branches taken at capture; a sliding-window layer switches to a rolling update once
    its window is full.  So a cache whose window is shorter than the decode is not capturable (a clear reason),
    one whose window holds the whole decode is."""
    transformers = pytest.importorskip("transformers")
    from armor.runtime.graphs import capture_blocker

    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=8)  # fmt: skip
    short = transformers.StaticCache(config=cfg, max_cache_len=12)
    assert "slides over 8 tokens, fewer than the 12" in capture_blocker(short, 12)
    cfg.sliding_window = 16
    assert capture_blocker(transformers.StaticCache(config=cfg, max_cache_len=12), 12) is None
    llama = make_tiny_model(64)
    assert capture_blocker(transformers.StaticCache(config=llama.config, max_cache_len=40), 40) is None


def test_decode_timing_on_cpu_runs_eagerly_and_reports_it():
    """The model-level decode benchmark off CUDA: eager steps, no capture to check against, no GPU memory."""
    from armor.bench.models import time_decode_steps

    model = make_tiny_model(64)
    r = time_decode_steps(model, torch.randint(0, 64, (2, 5)), steps=3, repeats=2)
    assert (r["captured"], r["matches_eager"], r["peak_mem_bytes"]) == (False, None, None)
    assert r["steps"] == 3 and r["batch"] == 2 and r["decode_tokens_per_s"] > 0


def test_cache_keyword_follows_the_forward_signature():
    """The static cache goes in under the name the model's forward takes: ``cache`` in recent transformers,
    ``past_key_values`` before; a forward with neither is refused instead of decoding without a cache."""
    from armor.runtime.graphs import cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    class Neither(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
    with pytest.raises(TypeError, match="Neither"):
        cache_keyword(Neither())


def test_gpu_benchmark_script_model_part_runs_on_a_tiny_llama():
    """benchmarks/gpu_runtime.py (the GPU table's command): its model part on a tiny random Llama, eager on
    CPU, so that the script a GPU session runs is known to work end to end."""
    pytest.importorskip("transformers")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_runtime.py"
    spec = importlib.util.spec_from_file_location("gpu_runtime", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.model_rows("tiny", torch.float32, (1, 2), steps=2, repeats=1)
    assert [(r["kind"], r["batch"]) for r in rows] == [(k, b) for k in ("dense", "2:4", "armor") for b in (1, 2)]
    assert all(r["decode_tokens_per_s"] > 0 and r["captured"] is False for r in rows)
    weights = {r["kind"]: r["weights_bytes"] for r in rows}
    assert weights["2:4"] < weights["armor"] < weights["dense"]
    table = script.format_model_rows(rows)
    assert len(table.splitlines()) == 2 + len(rows) and "| tiny | armor | float32 | 2 | False | - |" in table


def test_kernel_tiling_table_is_the_committed_sweeps_best():
    """``NM_TILES`` / ``BD_TILES`` state what benchmarks/gpu_tune_h200.json measured best (rows written before
    the kernel had named forms and splits read as join/gather, unsplit)."""
    import importlib.util
    import json
    from pathlib import Path

    from armor.runtime import gpu_kernels

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("gpu_tune", bench / "gpu_tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    nm, bd = tune.best_tiles(json.loads((bench / "gpu_tune_h200.json").read_text()))
    assert nm == gpu_kernels.NM_TILES and bd == gpu_kernels.BD_TILES
    assert all(t.expand in gpu_kernels.EXPANDS for t in tune._first_tiles(1))
    assert {t.expand for t in tune._first_tiles(64)} == {"gather"}


def test_tile_sweep_refines_every_form_and_picks_the_fastest(monkeypatch):
    """benchmarks/gpu_tune.py's staging without a GPU (its timing replaced by a made-up speed per tiling): stage 1
    per form, then warps x stages and splits around each form's best; the table it would commit names the
    fastest tiling per token count, and the ranking prints."""
    import importlib.util
    from pathlib import Path

    from armor.runtime.gpu_kernels import NMTile

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_tune.py"
    spec = importlib.util.spec_from_file_location("gpu_tune", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)

    def speed(tile: NMTile) -> float:  # the gather form, 8 warps, split 4 wins; every other choice costs
        return 1.0 + (tile.expand == "xgather") + (tile.warps == 8) + (tile.split == 4) - tile.rows / 1000

    def fake_time(kernel, layer, tokens, tiles, dense):
        return [{"kernel": kernel, "shape": layer["shape"], "tokens": tokens, "tile": list(t), "ms": 1 / speed(t),
                 "dense_ms": 1.0, "x_dense": speed(t), "rel_error": 0.0} for t in tiles]  # fmt: skip

    monkeypatch.setattr(tune, "_nm_layers", lambda dtype: [{"shape": "a"}, {"shape": "b"}])
    monkeypatch.setattr(tune, "_time", fake_time)
    rows = tune.sweep_nm(torch.float16)
    tried = {(r["tokens"], tune.nm_tile_of_row(r["tile"])) for r in rows}
    for form in ("join", "xselect", "xgather"):  # each one-token form got its warps and splits refined
        assert any(t == 1 and tile.expand == form and tile.split == 8 for t, tile in tried)
    nm, _ = tune.best_tiles({"rows": rows})
    assert nm[1] == NMTile(16, 64, 8, 2, "xgather", 4)
    assert nm[64].expand == "gather" and nm[16].expand == "join"  # the activation forms are one-token forms
    table = tune.ranking(rows, "nm", tune.NM_TOKENS, "(tiling)")
    assert "| 1 | (16, 64, 8, 2, 'xgather', 4) |" in table

    # a spent time budget: the sweep stops timing, and each token count's checkpoint keeps whole tilings
    clock = iter(range(10_000))
    monkeypatch.setattr(tune.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(tune, "deadline", 4.5)  # the clock reads 0, 1, ...: room for 5 tilings
    saved: list[list[dict]] = []
    rows = tune.sweep_nm(torch.float16, checkpoint=lambda r: saved.append(list(r)))
    assert len(saved) == len(tune.NM_TOKENS) and saved[-1] == rows
    assert len({tuple(r["tile"]) for r in rows}) == 5 and len(rows) == 10  # each on both shapes
    assert {r["tokens"] for r in rows} == {1}


@needs_numba
@pytest.mark.parametrize("in_f", [40, 288, 2800])  # kept 20 / 144 / 1400: no, some and a 24-entry tail of 32s
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_packed_bf16_dot_product_path_equals_reference(in_f, tokens, monkeypatch):
    """bfloat16 values and inputs take the CPU's bf16 dot-product kernel (AVX512-BF16) where the CPU has it:
    exact products summed in float32, so it agrees with the float64 product to float32 summation order."""
    import armor.runtime.kernels as kernels

    if not kernels._host_has_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    calls = []
    def counted(kernel):
        return lambda *a: calls.append(1) or kernel(*a)

    monkeypatch.setattr(kernels, "SPARSE_BF16", tuple(map(counted, kernels.SPARSE_BF16)))
    gen = torch.Generator().manual_seed(in_f + tokens)
    w = torch.randn(71, in_f, generator=gen)
    mask = nm_mask_from_scores(w.abs(), 2, 4)
    values, idx = pack_nm((w * mask).to(torch.bfloat16), mask)
    x = torch.randn(tokens, in_f, generator=gen).to(torch.bfloat16)
    y = kernels.nm_matmul(values, idx, x, 2, 4)
    ref = x.double() @ unpack_nm(values, idx, in_f).double().T
    assert calls == [1] and y.dtype == torch.float32
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5



@needs_numba
@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file locks")
def test_numba_cache_saves_exclusively_and_loads_shared(tmp_path):
    """numba's cache index is read, extended and rewritten unlocked, so two processes compiling at once could point
    one signature at the other's machine code.  Every kernel's cache saves under an exclusive lock on a file in
    the cache folder and loads under a shared one: a save waits for any holder, a load only for a saver."""
    import fcntl
    import threading
    from types import SimpleNamespace

    import numba

    import armor.runtime.kernels as kernels

    dispatchers = [v for v in vars(kernels).values() if isinstance(v, numba.core.dispatcher.Dispatcher)]
    assert len(dispatchers) >= 10 and all(hasattr(d._cache, "_cache_path") for d in dispatchers)  # all cached
    # the entry points' serial builds too (they live in (serial, parallel) pairs, not in the module's globals)
    entries = [kernels.UNPACK[0], kernels.SPARSE[0], kernels.SPARSE_BF16[0], kernels.ARMOR[0]]
    assert all(isinstance(d, numba.core.dispatcher.Dispatcher) for d in entries)
    dispatchers += entries
    assert all(hasattr(d._cache.save_overload, "__wrapped__") for d in dispatchers)
    assert all(hasattr(d._cache.load_overload, "__wrapped__") for d in dispatchers)

    calls: list[str] = []
    cache = SimpleNamespace(_cache_path=str(tmp_path), save_overload=lambda: calls.append("save"),
                            load_overload=lambda: calls.append("load"))
    kernels._serialise_cache_io([SimpleNamespace(_cache=cache)])

    def blocked_by(mode: int, io: str) -> bool:
        fd = os.open(tmp_path / kernels.CACHE_LOCK_NAME, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, mode)  # its own open file description: conflicts as another process's would
            worker = threading.Thread(target=getattr(cache, io))
            worker.start()
            worker.join(timeout=0.5)
            waited = worker.is_alive()
        finally:
            os.close(fd)
        worker.join(timeout=10)
        assert not worker.is_alive() and calls[-1] == io[:4]
        return waited

    assert blocked_by(fcntl.LOCK_EX, "save_overload") and blocked_by(fcntl.LOCK_EX, "load_overload")
    assert blocked_by(fcntl.LOCK_SH, "save_overload") and not blocked_by(fcntl.LOCK_SH, "load_overload")


_KERNEL_CALL = """
import sys, torch
from armor.runtime import kernels
from armor.runtime.packing import pack_nm
torch.set_num_threads(int(sys.argv[2]))
g = torch.Generator().manual_seed(0)
w = torch.randn(8, 32, generator=g)
mask = torch.zeros(8, 8, 4, dtype=torch.bool).scatter_(-1, torch.tensor([0, 2]).expand(8, 8, 2), True).reshape(8, 32)
values, idx = pack_nm(w * mask, mask)
x = torch.randn(3, 32, generator=g)
eye = torch.eye(8)
if sys.argv[1] == "armor":
    y = kernels.armor_matmul(eye.expand(4, 8, 8).contiguous(), values, idx, eye.expand(1, 8, 8).contiguous(), x, 2, 4)
else:
    y = kernels.nm_matmul(values, idx, x, 2, 4)
assert torch.allclose(y, x @ (w * mask).T, atol=1e-5), sys.argv
print("ok")
"""


@needs_numba
@pytest.mark.parametrize("threads", ["1 1 1", "2 2 1"])
def test_kernels_cached_by_other_processes_load_and_run(tmp_path, threads):
    """numba's on-disk cache across processes: one process compiles the ARMOR kernel, a second the 2:4 one (its
    shared parts loaded from the first's cache), a third loads the 2:4 kernel from the cache.  The third crashed
    (SIGSEGV) while a cached entry point called a parallel kernel (numba issue 8578)."""
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    for kind, n in zip(("armor", "sparse", "sparse"), threads.split(), strict=True):
        proc = subprocess.run([sys.executable, "-c", _KERNEL_CALL, kind, n], env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", (kind, n, proc.returncode, proc.stderr[-2000:])


def test_armor_bench_models_measures_a_compiled_pruned_folder(tmp_path, capsys):
    """``--compile``: the model's forward compiled, generation on a static cache, the same row fields as eager."""
    from armor.cli.bench import _measure_model, _ModelRun
    from armor.storage import save_pruned
    from conftest import make_char_tokenizer, run_cli

    model = make_tiny_model(len(make_char_tokenizer()), num_hidden_layers=1)
    pack_linears(model, 16)
    save_pruned(model, tmp_path / "p", tokenizer=make_char_tokenizer(), run_info={"method": "armor-fast"})
    run = _ModelRun(dtype_name=None, device="cpu", prompt=5, new=3, repeats=1, threads=None, compile_mode="default")
    torch._dynamo.reset()
    try:
        row = _measure_model(str(tmp_path / "p"), run)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert row["compile"] == "default" and row["new_tokens"] == 3 and row["decode_tokens_per_s"] > 0
    assert row["kind"] == "pruned (packed)" and graphs >= 2  # the prompt's graph and the decode step's
    rc, out, err = run_cli(capsys, "bench", "--compile")
    assert rc == 2 and "--compile applies to --models" in err and "armor runtime bench" not in out


def test_armor_bench_models_times_every_dtype_it_is_given(tmp_path, monkeypatch, capsys):
    """Before: ``--models ... --dtype float32,bfloat16`` timed float32 only, and the table had no dtype column."""
    import armor.cli.bench as bench
    from conftest import run_cli

    seen = []

    def measure(folder, run):
        seen.append((folder, run.dtype_name))
        return {"name": folder, "kind": "dense", "dtype": run.dtype_name, "prefill_tokens_per_s": 1.0,
                "decode_tokens_per_s": 2.0, "resident_bytes": 1, "peak_rss_bytes": None, "base_rss_bytes": None}

    class InProcess:  # the per-model process, run here
        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def submit(self, fn, *args):
            return type("Done", (), {"result": staticmethod(lambda: fn(*args))})

    monkeypatch.setattr(bench, "ProcessPoolExecutor", InProcess)
    monkeypatch.setattr(bench, "_measure_model", measure)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for folder in (a, b):
        os.makedirs(folder)
        open(os.path.join(folder, "config.json"), "w").write("{}")
    rc, out, _ = run_cli(capsys, "bench", "--models", a, b, "--dtype", "float32,bfloat16", "--device", "cpu")
    assert rc == 0
    assert seen == [(a, "float32"), (b, "float32"), (a, "bfloat16"), (b, "bfloat16")]
    assert f"| {a} | dense | float32 |" in out and f"| {b} | dense | bfloat16 |" in out


@pytest.mark.parametrize("kind", ["sparse", "armor"])
def test_autocast_and_input_width_give_one_behaviour_on_every_path(kind):
    """Before: under torch.autocast a float32 layer returned float32 on the packed path (4 tokens) and bfloat16 on
    the dense path (40 tokens); an input of the wrong width failed in a reshape ('shape [4, 32] is invalid')."""
    res = _armor_result() if kind == "armor" else _sparse_result()
    mod = module_from_result(res, torch.randn(96), torch.float32)
    for tokens in (4, 40):
        x = torch.randn(tokens, 128)
        ref = F.linear(x.double(), mod.dense_weight().double(), mod.bias.double())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = mod(x)
        assert y.dtype == torch.bfloat16, (tokens, mod.active_backend)
        _close(y, ref, 2e-2)
        with torch.no_grad():
            assert mod(x).dtype == torch.float32
    with pytest.raises(ValueError, match=r"takes inputs of 128 features .* got an input of shape \(4, 64\)"):
        mod(torch.randn(4, 64))
