"""The Triton kernels (armor.runtime.gpu_kernels) against the PyTorch reference: on a CUDA device when there is
one, else under Triton's interpreter on CPU tensors (tests/conftest.py sets ``TRITON_INTERPRET=1`` when no GPU
is present).  ``TRITON_INTERPRET=1 python -m pytest -k triton`` selects them.

Reference: the stored (dtype-rounded) packed state multiplied out in float64.  float32 agrees to summation order;
float16 / bfloat16 within their rounding of the output (ARMOR: plus the rounding of ``B' x`` to the dtype)."""

from __future__ import annotations

import os

import pytest
import torch

from armor.bench.layers import random_nm_result
from armor.factors import budget_block_sizes, choose_block_size
from armor.result import PruneResult
from armor.runtime import module_from_result, triton_status
from armor.runtime.gpu_kernels import (
    NMTile,
    block_diag_matmul_triton,
    nm_matmul_triton,
    triton_available,
    unpack_dense_cuda,
)
from armor.runtime.packing import pack_nm, unpack_nm
from armor.sparsity import nm_mask_from_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or triton_status(DEVICE, torch.float32) is not None,
    reason=f"the Triton kernels cannot run here: {triton_status(DEVICE, torch.float32)}",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative to the largest output: float32 to summation order, 16-bit floats within their output rounding
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _max_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()


def _inputs(tokens: int, width: int, dtype: torch.dtype, strided: bool, seed: int = 0) -> torch.Tensor:
    """``(tokens, width)`` activations; ``strided``: every other column of a wider tensor (non-contiguous)."""
    x = torch.randn(tokens, 2 * width if strided else width, generator=torch.Generator().manual_seed(seed))
    x = x.to(device=DEVICE, dtype=dtype)
    return x[:, ::2] if strided else x


def _packed(out_f: int, in_f: int, n: int, m: int, dtype: torch.dtype, seed: int = 0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask_from_scores(w.abs(), n, m)
    values, idx = pack_nm((w * mask).to(dtype), mask, n, m)
    return values.to(DEVICE), idx.to(DEVICE)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (2, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,strided", [(1, False), (5, True), (17, False), (64, True)])
def test_triton_nm_matmul_equals_reference(n, m, dtype, tokens, strided):
    out_f, in_f = 40, 72 * m  # partial tiles of rows and of input columns
    values, idx = _packed(out_f, in_f, n, m, dtype, seed=n * 10 + m)
    bias = torch.randn(out_f).to(device=DEVICE, dtype=dtype)
    x = _inputs(tokens, in_f, dtype, strided)
    assert x.is_contiguous() == (not strided)
    y = nm_matmul_triton(values, idx, x, n, m, bias)
    assert y.shape == (tokens, out_f) and y.dtype == dtype and y.device.type == DEVICE
    dense = unpack_nm(values.cpu(), idx.cpu(), in_f, n, m).double()
    ref = x.double().cpu() @ dense.T + bias.double().cpu()
    assert _max_rel_error(y, ref) <= TOL[dtype]


TILINGS = [
    NMTile(16, 64, 2, 2, "join"),
    NMTile(32, 128, 4, 3, "gather"),
    NMTile(16, 32, 2, 2, "xselect"),
    NMTile(16, 64, 4, 2, "xgather"),
    NMTile(16, 32, 2, 2, "join", split=3),  # 3 shares of 72 / 164 columns: one share may be short or empty
    NMTile(16, 16, 2, 2, "xselect", split=4),
]


@pytest.mark.parametrize("tile", TILINGS, ids=lambda t: f"{t.expand}-{t.columns}-split{t.split}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,strided", [(1, True), (3, False), (20, True)])
@pytest.mark.parametrize("in_groups", [18, 41])  # 41: an odd group count, so the last index byte is half used
def test_triton_nm_matmul_every_tiling_equals_reference(tile, dtype, tokens, strided, in_groups):
    """Every way of combining a 2:4 core with the activations (weight tile by join or gather, activations
    selected or gathered per kept entry), split or not, the one-token row-sum path and the tensor-core path,
    with input widths that end inside a tile; and a bias added once whatever the split."""
    out_f, in_f = 24, 4 * in_groups
    values, idx = _packed(out_f, in_f, 2, 4, dtype, seed=in_groups)
    bias = torch.randn(out_f).to(device=DEVICE, dtype=dtype)
    x = _inputs(tokens, in_f, dtype, strided, seed=tokens)
    y = nm_matmul_triton(values, idx, x, 2, 4, bias, tile=tile)
    assert y.shape == (tokens, out_f) and y.dtype == dtype
    ref = x.double().cpu() @ unpack_nm(values.cpu(), idx.cpu(), in_f, 2, 4).double().T + bias.double().cpu()
    assert _max_rel_error(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("tile", TILINGS, ids=lambda t: f"{t.expand}-{t.columns}-split{t.split}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_nm_matmul_whole_tiles_take_the_unmasked_loads(tile, dtype):
    """One token on a layer made of whole row tiles and whole input steps (as the 7B shapes are): the kernel
    drops its bounds masks there, and must still read exactly the layer."""
    out_f, in_f = 64, 512  # 256 kept entries: a whole number of steps for every tiling above
    values, idx = _packed(out_f, in_f, 2, 4, dtype, seed=5)
    x = _inputs(1, in_f, dtype, strided=True, seed=6)
    y = nm_matmul_triton(values, idx, x, 2, 4, tile=tile)
    ref = x.double().cpu() @ unpack_nm(values.cpu(), idx.cpu(), in_f, 2, 4).double().T
    assert _max_rel_error(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("n,m", [(4, 8), (1, 4), (2, 3)])
@pytest.mark.parametrize("expand", ["xselect", "xgather", "join"])
@pytest.mark.parametrize("tokens", [1, 6])
def test_triton_nm_matmul_other_patterns_take_the_general_forms(n, m, expand, tokens):
    """The 2:4-only forms fall back to their any-n:m forms (xselect -> xgather, join -> gather) for other
    patterns, split into shares too."""
    out_f, in_f = 20, 37 * m
    values, idx = _packed(out_f, in_f, n, m, torch.float32, seed=m)
    x = _inputs(tokens, in_f, torch.float32, strided=True, seed=n)
    y = nm_matmul_triton(values, idx, x, n, m, tile=NMTile(16, 16, 2, 2, expand, split=2))
    ref = x.double().cpu() @ unpack_nm(values.cpu(), idx.cpu(), in_f, n, m).double().T
    assert _max_rel_error(y, ref) <= TOL[torch.float32]


@pytest.mark.parametrize(
    "tile,match",
    [(NMTile(16, 64, expand="dense"), "expand must be one of"), (NMTile(16, 48, expand="xgather"), "power of two"),
     (NMTile(16, 64, split=0), "split >= 1"), (NMTile(16, 4, expand="join"), "multiple of 8"),
     (NMTile(16, 4, expand="xgather"), "8 kept entries")],
)  # fmt: skip
def test_triton_nm_matmul_refuses_a_bad_tiling(tile, match):
    values, idx = _packed(8, 64, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=match):
        nm_matmul_triton(values, idx, torch.zeros(1, 64, device=DEVICE), 2, 4, tile=tile)


def test_triton_nm_matmul_wrong_input_raises():
    values, idx = _packed(8, 64, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        nm_matmul_triton(values, idx, torch.zeros(2, 60, device=DEVICE), 2, 4)


@pytest.mark.parametrize("size", [1, 18, 40, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_block_diag_equals_reference(size, dtype):
    k = max(1, 256 // size)
    gen = torch.Generator().manual_seed(size)
    blocks = (torch.eye(size) + 0.1 * torch.randn(k, size, size, generator=gen)).to(device=DEVICE, dtype=dtype)
    x = _inputs(3, k * size, dtype, strided=True, seed=size)
    y = block_diag_matmul_triton(blocks, x)
    ref = torch.einsum("qij,tqj->tqi", blocks.double().cpu(), x.double().cpu().reshape(3, k, size)).reshape(3, -1)
    assert y.shape == (3, k * size) and y.dtype == dtype
    assert _max_rel_error(y, ref) <= TOL[dtype]


def _armor_result(out_f: int, in_f: int, bo: int, bi: int, seed: int) -> PruneResult:
    res = random_nm_result(out_f, in_f, None, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    res.a_blocks = torch.eye(bo) + 0.1 * torch.randn(out_f // bo, bo, bo, generator=gen)
    res.b_blocks = torch.eye(bi) + 0.1 * torch.randn(in_f // bi, bi, bi, generator=gen)
    res.block_size_out, res.block_size_in = bo, bi
    return res


ARMOR_LAYERS = {
    # SmolLM2's 576-wide layers at the default budget: blocks of 18 / 16
    "budgeted": (576, 576, *budget_block_sizes(576, 576)),
    # blocks that are no power of two and differ on the two sides
    "ragged": (72, 96, choose_block_size(72, 24), choose_block_size(96, 32, multiple_of=4)),
    "block128": (256, 128, 128, 128),
}


@pytest.mark.parametrize("layer", list(ARMOR_LAYERS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_triton_armor_module_equals_reconstruction(layer, dtype, tokens):
    out_f, in_f, bo, bi = ARMOR_LAYERS[layer]
    mod = module_from_result(
        _armor_result(out_f, in_f, bo, bi, seed=tokens), torch.randn(out_f), dtype, device=DEVICE, backend="triton"
    )
    assert (mod.block_size_out, mod.block_size_in) == (bo, bi)
    x = _inputs(2 * tokens, in_f, dtype, strided=True).reshape(2, tokens, -1)  # 3-D as in a model
    with torch.inference_mode():
        y = mod(x)
    assert mod.active_backend == "triton" and y.shape == (2, tokens, out_f) and y.dtype == dtype
    core = unpack_nm(mod.values.cpu(), mod.indices.cpu(), in_f, mod.n, mod.m).double()
    a, b = mod.a_blocks.double().cpu(), mod.b_blocks.double().cpu()
    w_hat = torch.block_diag(*a) @ core @ torch.block_diag(*b)
    ref = x.double().cpu() @ w_hat.T + mod.bias.double().cpu()
    # 16-bit: B' x is rounded to the dtype before the core (as on the dense path): 3x the output tolerance
    assert _max_rel_error(y, ref) <= (1 if dtype == torch.float32 else 3) * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_sparse_module_equals_reconstruction(dtype):
    mod = module_from_result(random_nm_result(96, 160, None, seed=3), None, dtype, device=DEVICE, backend="triton")
    x = _inputs(3, 160, dtype, strided=False)
    with torch.inference_mode():
        y = mod(x)
    assert mod.active_backend == "triton"
    ref = x.double().cpu() @ mod.dense_weight().double().cpu().T
    assert _max_rel_error(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_unpack_equals_the_pytorch_unpack(n, m, dtype):
    """Bit-exact against ``unpack_nm``, a partial last tile included (300 groups)."""
    values, idx = _packed(37, m * 300, n, m, dtype, seed=n * 10 + m)
    out = unpack_dense_cuda(values, idx, m * 300, n, m)
    assert torch.equal(out.cpu(), unpack_nm(values.cpu(), idx.cpu(), m * 300, n, m))


def _gpu_sass():
    """benchmarks/gpu_sass.py as a module (it compiles for a GPU target with the ptxas triton ships)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sass.py"
    spec = importlib.util.spec_from_file_location("gpu_sass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_sass_loop_body_is_the_longest_backward_branch():
    sass = _gpu_sass()
    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R3, R4, R2 ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDG.E.U16 R5, desc[UR4][R6.64] ;
        /*0040*/                   HADD2.F32 R7, -RZ, R5.H0_H0 ;
        /*0050*/                   FFMA R2, R7, R4, R2 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""
    body = sass.loop_body(text)
    assert [ins.split()[0] for ins in body] == ["LDG.E.U16", "HADD2.F32", "FFMA", "@!P1"]


def test_triton_sass_compiles_the_one_token_forms_for_hopper():
    """benchmarks/gpu_sass.py compiles every tiling of its table for sm_90 ahead of time (no GPU; in its own
    process, as this one may run Triton's interpreter): no tiling spills, and each row has a main loop."""
    import subprocess
    import sys
    from pathlib import Path

    sass = _gpu_sass()
    if not os.path.exists(os.path.join(sass.NVIDIA_BIN, "ptxas")):
        pytest.skip("this triton has no NVIDIA backend tools")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script), "--arch", "90"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| (")]
    assert len(rows) == len(sass.TILES)
    assert all(int(r[3]) == 0 and int(r[4]) > 0 and 0 < float(r[5]) < 10 for r in rows)  # no spills; a loop
