"""GPU checks of the runtime: the ``semi_structured`` and ``triton`` backends against the dense reconstruction,
for plain 2:4 and ARMOR layers at the Llama-2-7B shapes in float16 / bfloat16, and a pruned model's decode step
captured in a CUDA graph replaying to the same logits as eager.  tests/test_triton_kernels.py runs its kernel
checks (2:4 and 4:8, ragged and budgeted blocks, three dtypes, odd token counts, strided inputs) on the GPU too
when one is present.

Skipped without a CUDA device of compute capability >= 8.0.  The GPU timing table comes from
``python benchmarks/gpu_runtime.py`` (see benchmarks/RESULTS_runtime.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from armor.bench.layers import random_nm_result
from armor.runtime import TRITON_MAX_TOKENS, module_from_result, semi_structured_status
from armor.runtime.gpu_kernels import triton_available
from conftest import make_tiny_model, pack_linears

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
    # auto takes the Triton kernels up to TRITON_MAX_TOKENS tokens (transient dense above, or without triton),
    # which compute the same function within the same rounding
    mod.backend = "auto"
    with torch.inference_mode():
        y_auto = mod(x)
    expected = "triton" if triton_available() and tokens <= TRITON_MAX_TOKENS else "dense"
    assert mod.active_backend == expected and mod.cache_nbytes() == 0
    assert _max_rel_error(y_auto, ref) <= (3 if kind == "armor" else 1) * TOL[dtype]


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("out_f,in_f", LLAMA7B_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sparse", "armor"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64])
def test_triton_backend_equals_dense_reconstruction_7b(out_f, in_f, dtype, kind, tokens):
    res = random_nm_result(out_f, in_f, 128 if kind == "armor" else None, seed=tokens)
    mod = module_from_result(res, torch.randn(out_f), dtype, device="cuda", backend="triton")
    x = torch.randn(tokens, 2 * in_f, device="cuda").to(dtype)[:, ::2]  # strided, as a slice of a wider tensor
    with torch.inference_mode():
        y = mod(x)
    torch.cuda.synchronize()
    assert mod.active_backend == "triton" and y.shape == (tokens, out_f) and y.dtype == dtype
    ref = F.linear(x.double(), mod.dense_weight().double(), mod.bias.double())
    assert _max_rel_error(y, ref) <= (3 if kind == "armor" else 1) * TOL[dtype]


def _first_step(model, ids: torch.Tensor, capture: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's greedy next token and the logits of the first decode step after it, eager or replayed from a
    captured CUDA graph (armor.runtime.graphs.start_decoding)."""
    from armor.runtime.graphs import start_decoding

    with torch.inference_mode():
        step, token, _ = start_decoding(model, ids, 4, capture=capture)
        logits = step().clone()
        torch.cuda.synchronize()
    return token, logits


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_captured_decode_step_replays_to_eager_logits(dtype):
    """A Llama whose decoder linears are packed (ARMOR and plain 2:4, auto backend = Triton for one token):
    the decode step captured in a CUDA graph gives the eager step's logits, and greedy decoding with the graph
    gives the eager run's tokens (tests/test_runtime.py checks the eager run against ``model.generate``)."""
    pytest.importorskip("transformers")
    from armor.runtime.graphs import greedy_decode

    model = make_tiny_model(256, hidden_size=256, intermediate_size=512, max_position_embeddings=128, tie=False)
    model.generation_config.eos_token_id = None
    pack_linears(model, 64)
    model = model.to(device="cuda", dtype=dtype)
    ids = torch.randint(0, 256, (2, 7), device="cuda")
    (token, eager), (token_g, replayed) = _first_step(model, ids, capture=False), _first_step(model, ids, capture=True)
    assert torch.equal(token, token_g)  # the same prompt's next token
    assert {m.active_backend for m in model.modules() if hasattr(m, "active_backend")} == {"triton"}
    assert torch.equal(replayed, eager)
    # whole greedy runs: replayed steps give the eager steps' tokens
    assert torch.equal(greedy_decode(model, ids, 6, capture=True), greedy_decode(model, ids, 6, capture=False))
    # the model-level benchmark's runs: three captures on fresh caches, then its own replay-vs-eager check
    from armor.bench.models import time_decode_steps

    r = time_decode_steps(model, ids, steps=8, repeats=3)
    assert r["captured"] is True and r["matches_eager"] is True


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_captured_decoding_of_a_pruned_mixture_of_experts_gives_the_eager_tokens():
    """A Mixtral whose attention and per-expert linears are packed: the captured step runs every expert (no host
    read-back of the routing), replays to the eager logits and gives the eager run's greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from armor.models import unfuse_experts
    from armor.runtime.graphs import greedy_decode

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    unfuse_experts(model)
    packed = pack_linears(model, 64, names=[n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                                            and (".experts." in n or ".self_attn." in n)])
    assert any(".experts.down_proj." in n for n in packed)
    model = model.to(device="cuda", dtype=torch.float16)
    ids = torch.randint(0, 256, (2, 7), device="cuda")
    (_, eager), (_, replayed) = _first_step(model, ids, capture=False), _first_step(model, ids, capture=True)
    torch.testing.assert_close(replayed, eager, rtol=2e-3, atol=2e-3)  # every-expert vs routed summation
    assert torch.equal(greedy_decode(model, ids, 6, capture=True), greedy_decode(model, ids, 6, capture=False))


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_generate_compiles_captured_decoding_to_the_eager_tokens():
    """transformers' ``generate`` with a static cache compiles the decode step (``mode="reduce-overhead"``: Inductor
    plus CUDA graphs) for a pruned model as for a dense one; the packed kernels are operators in that graph
    (armor.runtime.ops), and the tokens are the eager run's."""
    pytest.importorskip("transformers")
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = make_tiny_model(256, hidden_size=256, intermediate_size=512, max_position_embeddings=128, tie=False)
    model.generation_config.eos_token_id = None
    pack_linears(model, 64)
    model = model.to(device="cuda", dtype=torch.float16)
    ids = torch.randint(0, 256, (1, 7), device="cuda")
    eager = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static", disable_compile=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert counters["stats"]["unique_graphs"] >= 1  # generate compiled the decode step
    assert torch.equal(compiled, eager)


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
