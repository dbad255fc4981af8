"""GPU checks of the runtime: the ``semi_structured`` backend (2:4 sparse tensor cores) against the dense
reconstruction, for plain 2:4 and ARMOR layers at the Llama-2-7B shapes in float16 / bfloat16.

Skipped without a CUDA device of compute capability >= 8.0.  The GPU timing table comes from
``python benchmarks/bench_runtime.py --device cuda ...`` (the command is in benchmarks/RESULTS_runtime.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from armor.runtime import module_from_result, semi_structured_status
from armor.runtime.bench import random_nm_result
from armor.runtime.gpu_kernels import triton_available, unpack_dense_cuda
from armor.runtime.packing import pack_nm, unpack_nm
from armor.sparsity import nm_mask_from_scores

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or semi_structured_status("cuda", torch.float16) is not None,
    reason="needs a CUDA GPU with 2:4 sparse tensor cores (compute capability >= 8.0)",
)

LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
# fp16 has a 10-bit mantissa, bf16 a 7-bit one; the kernels accumulate in float32 over up to 11008 products
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _max_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("out_f,in_f", LLAMA7B_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sparse", "armor"])
@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_semi_structured_equals_dense_reconstruction(out_f, in_f, dtype, kind, tokens):
    res = random_nm_result(out_f, in_f, 128 if kind == "armor" else None, seed=tokens)
    bias = torch.randn(out_f)
    mod = module_from_result(res, bias, dtype, device="cuda", backend="semi_structured")
    x = torch.randn(tokens, in_f, device="cuda").to(dtype)
    with torch.inference_mode():
        y = mod(x)
    torch.cuda.synchronize()
    assert mod.active_backend == "semi_structured"
    assert y.shape == (tokens, out_f) and y.dtype == dtype
    # reference: the stored (dtype-rounded) factors multiplied out in float64
    ref = F.linear(x.double(), mod.dense_weight().double(), mod.bias.double())
    if kind == "armor":
        # ARMOR rounds the wrapper products to the dtype between the three matmuls: compare against the
        # same chain in float64 from the stored factors, and the tolerance covers the two extra roundings
        assert _max_rel_error(y, ref) <= 3 * TOL[dtype]
    else:
        assert _max_rel_error(y, ref) <= TOL[dtype]
    # auto takes the transient-dense path on CUDA (faster in eager mode, see armor.runtime.modules), which
    # computes the same function within the same rounding
    mod.backend = "auto"
    with torch.inference_mode():
        y_auto = mod(x)
    assert mod.active_backend == "dense" and mod.cache_nbytes() == 0
    assert _max_rel_error(y_auto, ref) <= (3 if kind == "armor" else 1) * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sparse", "armor"])
def test_semi_structured_resident_memory(dtype, kind):
    out_f, in_f = 4096, 4096
    mod = module_from_result(
        random_nm_result(out_f, in_f, 128 if kind == "armor" else None),
        None,
        dtype,
        device="cuda",
        backend="semi_structured",
    )
    dense_bytes = out_f * in_f * torch.empty((), dtype=dtype).element_size()
    with torch.inference_mode():
        mod(torch.randn(16, in_f, device="cuda").to(dtype))
    assert mod.active_backend == "semi_structured"
    # the compressed core is cached next to the packed state; no dense copy is kept
    assert 0 < mod.cache_nbytes() < 0.7 * dense_bytes
    assert mod.resident_nbytes() == mod.stored_nbytes() + mod.cache_nbytes()
    mod.drop_cache()
    assert mod.cache_nbytes() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_backend_on_cuda_keeps_no_cache(dtype):
    res = random_nm_result(1024, 1024, 128)
    mod = module_from_result(res, None, dtype, device="cuda", backend="dense")
    x = torch.randn(8, 1024, device="cuda").to(dtype)
    with torch.inference_mode():
        y = mod(x)
    assert mod.active_backend == "dense" and mod.cache_nbytes() == 0
    ref = F.linear(x.double(), mod.dense_weight().double())
    assert _max_rel_error(y, ref) <= 3 * TOL[dtype]


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_unpack_equals_the_pytorch_unpack(n, m, dtype):
    """Bit-exact against ``unpack_nm`` on fresh random cores, a partial last tile included (300 groups)."""
    gen = torch.Generator().manual_seed(n * 10 + m)
    w = torch.randn(37, m * 300, generator=gen)
    mask = nm_mask_from_scores(w.abs(), n, m)
    values, idx = pack_nm((w * mask).to(dtype), mask, n, m)
    values, idx = values.cuda(), idx.cuda()
    out = unpack_dense_cuda(values, idx, w.shape[1], n, m)
    assert torch.equal(out, unpack_nm(values, idx, w.shape[1], n, m))
