"""Tests of armor.runtime: packed storage, ArmorLinear / SparseLinear, save/load, backends, bench helpers.

All PruneResults are built by hand (random wrappers, core and n:m mask) so that these tests do not depend on
the solvers and exercise arbitrary (not near-identity) wrappers.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from armor import PruneResult
from armor.factors import block_product
from armor.runtime import (
    ArmorLinear,
    SparseLinear,
    empty_module_from_spec,
    module_from_result,
    pack_nm,
    state_nbytes,
    unpack_mask,
    unpack_nm,
)
from armor.runtime.bench import (
    add_bench_arguments,
    bench_main,
    format_layer_table,
    random_nm_result,
    run_layer_bench,
    storage_report,
)
from armor.runtime.packing import packed_index_shape
from armor.sparsity import is_nm_mask, nm_mask_from_scores

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
@pytest.mark.parametrize("backend", ["dense", "folded", "auto"])
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


def test_weight_property_and_no_dense_parameter():
    mod = module_from_result(_armor_result(), torch.randn(96), torch.float16)
    names = dict(mod.named_parameters()) | dict(mod.named_buffers())
    assert "weight" not in names
    assert set(mod.state_dict()) == {"values", "indices", "a_blocks", "b_blocks", "bias"}
    w = mod.weight
    assert w.shape == (96, 128) and w.dtype == torch.float16 and w.device.type == "cpu"
    assert mod.in_features == 128 and mod.out_features == 96


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


def test_load_does_not_build_dense_cache_and_cache_follows_state():
    src = module_from_result(_armor_result(), None, torch.float32, backend="dense")
    mod = empty_module_from_spec(src.spec(), dtype=torch.float32, backend="dense")
    mod.load_state_dict(src.state_dict())
    assert mod.cache_nbytes() == 0  # nothing dense until the first forward
    x = torch.randn(3, 128)
    y = mod(x)
    assert mod.cache_nbytes() == 96 * 128 * 4
    mod.drop_cache()
    assert mod.cache_nbytes() == 0
    torch.testing.assert_close(mod(x), y)
    # A later load must not reuse the stale cache.
    other = module_from_result(_armor_result(seed=9), None, torch.float32)
    mod.load_state_dict(other.state_dict())
    torch.testing.assert_close(mod(x), other(x), rtol=1e-5, atol=1e-5)
    # Nor an in-place edit of the values.
    with torch.no_grad():
        mod.values.mul_(2.0)
    torch.testing.assert_close(mod(x), 2 * other(x), rtol=1e-5, atol=1e-5)


def test_dtype_conversion_of_module():
    mod = module_from_result(_armor_result(), torch.randn(96), torch.float32, backend="dense")
    x = torch.randn(4, 128)
    mod(x)  # builds a float32 cache
    mod = mod.to(torch.bfloat16)
    assert mod.values.dtype == torch.bfloat16 and mod.indices.dtype == torch.uint8
    assert mod.cache_nbytes() == 0
    assert mod(x.bfloat16()).dtype == torch.bfloat16


def test_inference_mode_cache_usable_outside():
    mod = module_from_result(_sparse_result(), None)
    x = torch.randn(2, 128)
    with torch.inference_mode():
        y = mod(x)
    x.requires_grad_(True)
    out = mod(x)  # the cache built under inference_mode must be an ordinary tensor
    out.sum().backward()
    torch.testing.assert_close(out.detach(), y)
    assert x.grad is not None


# ----------------------------------------------------------------------------------------------------
# backends
def test_backends_on_cpu():
    mod = module_from_result(_armor_result(), None, torch.float16)
    assert mod.backend == "auto" and mod.active_backend == "folded"
    mod.backend = "dense"
    assert mod.active_backend == "dense"
    sp = module_from_result(_sparse_result(), None, torch.float16)
    assert sp.active_backend == "dense"
    with pytest.raises(ValueError, match="unknown backend"):
        sp.backend = "folded"  # only ARMOR layers can fold
    with pytest.raises(ValueError, match="unknown backend"):
        mod.backend = "gather"


@pytest.mark.parametrize("make", [_armor_result, _sparse_result])
def test_forcing_semi_structured_on_cpu_raises(make):
    mod = module_from_result(make(), None, torch.float16, backend="semi_structured")
    with pytest.raises(RuntimeError, match="semi_structured.*CUDA"):
        mod(torch.randn(2, 128, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="CUDA"):
        _ = mod.active_backend


# ----------------------------------------------------------------------------------------------------
# bench helpers (tiny sizes)
def test_run_layer_bench_small():
    recs = run_layer_bench([(64, 128)], [1, 4], torch.float32, "cpu", repeats=2, warmup=1, block_size=32)
    methods = {r["method"] for r in recs}
    assert methods == {"dense", "sparse-2:4", "armor-b32", "armor-b32-factorised"}
    assert len(recs) == 8
    for r in recs:
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["speedup_vs_dense"] > 0
    by = {(r["method"], r["batch"]): r for r in recs}
    assert by[("dense", 1)]["stored_bytes"] == 64 * 128 * 4
    assert by[("sparse-2:4", 1)]["stored_bytes"] == 64 * 64 * 4 + 64 * 16
    assert by[("armor-b32-factorised", 1)]["backend"] == "dense"
    assert "| 64x128 |" in format_layer_table(recs)


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


def test_bench_cli_storage_only(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path / "b.json"
    args = parser.parse_args(
        [
            "--shapes",
            "64x128",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--block-size",
            "32",
            "--no-storage",
            "--json",
            str(out),
        ]
    )
    assert bench_main(args) == 0
    assert "| 64x128 | 1 | armor-b32 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["layers"]


def test_model_timing_helpers():
    transformers = pytest.importorskip("transformers")
    from armor.runtime.bench import time_generation, time_prefill

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
    assert gen["new_tokens"] == 4 and gen["tokens_per_s"] > 0


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
