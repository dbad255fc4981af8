"""``torch.compile`` of pruned models: the kernels are operators (armor.runtime.ops) that dynamo keeps whole, so a
pruned model traces into one graph (``fullgraph=True`` raises at any graph break) and gives the eager results, on
every path a forward can take (packed kernels, the transient-dense path for long inputs, the Triton kernels), and
transformers' ``generate`` compiles its static-cache decoding as for a dense model.

Most tests compile with ``backend="aot_eager"``: it runs every operator's shape function (fake tensors) and the
graph as captured, without Inductor's C++ build; one test runs Inductor itself."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from armor.runtime import ArmorLinear, SparseLinear, numba_available, triton_status
from armor.runtime import ops as armor_ops
from armor.runtime.packing import pack_nm
from armor.sparsity import nm_mask_from_scores
from conftest import make_tiny_model, pack_linears

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")
needs_triton = pytest.mark.skipif(
    triton_status("cpu", torch.float32) is not None, reason=f"{triton_status('cpu', torch.float32)}"
)
VOCAB = 64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _tiny_pruned(backend: str = "auto", dtype: torch.dtype = torch.float32, layers: int = 2):
    model = make_tiny_model(VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers)
    pack_linears(model, 16, backend=backend)
    return model.to(dtype)


def _packed_backends(model) -> set[str]:
    return {m.active_backend for m in model.modules() if isinstance(m, (ArmorLinear, SparseLinear))}


def _operands(dtype: torch.dtype, tokens: int, n: int = 2, m: int = 4):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    mask = nm_mask_from_scores(w.abs(), n, m)
    values, idx = pack_nm((w * mask).to(dtype), mask, n, m)
    blocks = lambda k: torch.randn(k, 16, 16, generator=gen).to(dtype)  # noqa: E731
    return values, idx, torch.randn(tokens, 64, generator=gen).to(dtype), blocks(4), blocks(2)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_packed_operators_pass_opcheck(dtype, n, m):
    # schema, fake (shape) function against the kernel, and dispatch under AOT tracing with dynamic shapes
    values, idx, x, b_blocks, a_blocks = _operands(dtype, 3, n, m)
    ops = torch.ops.armor
    torch.library.opcheck(ops.packed_nm_matmul, (values, idx, x, n, m))
    torch.library.opcheck(ops.packed_armor_matmul, (b_blocks, values, idx, a_blocks, x, n, m))
    torch.library.opcheck(ops.packed_unpack, (values, idx, n, m))


@needs_triton
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_operators_pass_opcheck(with_bias):
    values, idx, x, b_blocks, a_blocks = _operands(torch.float32, 3)
    bias = torch.randn(32) if with_bias else None
    ops = torch.ops.armor
    torch.library.opcheck(ops.triton_nm_matmul, (values, idx, x, 2, 4, bias))
    torch.library.opcheck(ops.triton_armor_matmul, (b_blocks, values, idx, a_blocks, x, 2, 4, bias))
    torch.library.opcheck(ops.triton_unpack, (values, idx, 64, 2, 4))


def test_eager_calls_go_to_the_kernels_and_traced_calls_to_the_operators(monkeypatch):
    values, idx, x, _, _ = _operands(torch.float32, 2)
    seen = []
    monkeypatch.setattr(armor_ops, "_packed_unpack", lambda *a: seen.append("operator") or torch.zeros(32, 64))
    call = armor_ops._traced_as(lambda *a: armor_ops._packed_unpack(*a), lambda *a: seen.append("kernel"))
    call(values, idx, 2, 4)
    torch.compile(lambda v, i: call(v, i, 2, 4), backend="eager", fullgraph=True)(values, idx)
    assert seen == ["kernel", "operator"]


@pytest.mark.parametrize(
    "backend,tokens,ran",
    [
        pytest.param("auto", 1, "packed", marks=needs_numba),
        pytest.param("auto", 9, "packed", marks=needs_numba),
        ("auto", 40, "dense"),  # above CPU_PACKED_MAX_TOKENS: the core unpacked for the call
        ("dense", 3, "dense"),
        pytest.param("triton", 5, "triton", marks=needs_triton),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pruned_model_compiles_to_one_graph_with_the_eager_logits(backend, tokens, ran, dtype):
    model = _tiny_pruned(backend, dtype)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        model(torch.zeros(1, 41, dtype=torch.long))  # an eager call on another path first: active_backend moves
        ref = model(ids).logits
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert _packed_backends(model) == {ran}  # the compiled call ran, and recorded, the expected path


def test_inductor_compiles_a_pruned_model_to_the_eager_logits():
    model = _tiny_pruned(layers=1)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(ids).logits
        again = compiled(ids).logits  # the second call replays the compiled graph: no new trace
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_module_recompiles_when_its_backend_changes():
    model = _tiny_pruned()
    ids = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(ids)
        for mod in model.modules():
            if isinstance(mod, (ArmorLinear, SparseLinear)):
                mod.backend = "dense"
        compiled(ids)
    assert counters["stats"]["unique_graphs"] == 2
    assert _packed_backends(model) == {"dense"}
