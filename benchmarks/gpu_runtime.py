"""The GPU table of benchmarks/RESULTS_runtime.md in one command (needs a CUDA GPU and triton):

    python benchmarks/gpu_runtime.py --out benchmarks/gpu_runtime.json > benchmarks/gpu_runtime.md

1. Layers: the three Llama-2-7B shapes at 1, 4, 16, 64 and 2048 tokens, dense ``F.linear`` vs plain 2:4 vs
   ARMOR (blocks of the default wrapper budget: 128 on these shapes), each pruned layer on the ``triton`` and
   the transient-``dense`` backend, float16 and bfloat16; per call: the GPU time of its kernels (profiler) and
   the time of one replay of the call captured in a CUDA graph.
2. Model: a random Llama with Llama-2-7B shapes (32 layers, 4096 / 11008), dense vs every decoder linear pruned
   2:4 vs ARMOR, greedy decode tokens/s at batch 1 and 16 with the step captured in a CUDA graph
   (:mod:`armor.runtime.graphs`), weights bytes and peak GPU memory (the model's weights, KV cache, graph pool
   and activations; the other variants' layers, held on the device meanwhile, are subtracted).

``--layers-only`` / ``--models-only`` run one part; ``--model-config tiny`` runs part 2 on a small random Llama
(any device, eager off CUDA), which is how the test-suite checks this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn

from armor.bench.layers import SHAPE_SETS, run_layer_bench
from armor.bench.models import model_resident_bytes, time_decode_steps
from armor.cli.bench_tables import fmt_bytes
from armor.factors import DEFAULT_WRAPPER_BUDGET, budget_block_sizes
from armor.result import PruneResult
from armor.runtime import module_from_result
from armor.sparsity import nm_mask_from_scores

TOKENS = (1, 4, 16, 64, 2048)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_CONFIGS = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128},
}  # fmt: skip


def layer_rows(
    dtypes: list[str], tokens: tuple[int, ...], repeats: int, timings: tuple[str, ...] = ("kernels", "graph")
) -> list[dict[str, Any]]:
    """Kernel time and graph-replay time of every (dtype, shape, tokens, method, backend), one row each."""
    shapes = SHAPE_SETS["llama7b"]
    blocks = {budget_block_sizes(o, i, DEFAULT_WRAPPER_BUDGET) for o, i in shapes}
    if len(blocks) != 1 or len(set(next(iter(blocks)))) != 1:
        raise RuntimeError(f"the default budget gives blocks {blocks} on {shapes}: expected one square size")
    block = next(iter(blocks))[0]
    rows: dict[tuple, dict[str, Any]] = {}
    for name in dtypes:
        for timing in timings:
            recs = run_layer_bench(
                shapes, tokens, DTYPES[name], "cuda", repeats, 3, block, backends=("triton", "dense"), timing=timing
            )
            for r in recs:
                key = (r["dtype"], r["shape"], r["batch"], r["method"], r["backend"])
                row = rows.setdefault(key, {k: r[k] for k in ("dtype", "shape", "batch", "method", "backend")})
                row["ran"] = r["active_backend"]
                row[f"{timing}_ms"] = r["median_s"] * 1e3
                row[f"{timing}_vs_dense"] = r["speedup_vs_dense"]
                row["resident_vs_dense"] = r["resident_vs_dense"]
            print(f"layers {name} {timing}: done", file=sys.stderr, flush=True)
        # each dtype's table as soon as it is measured: a run stopped later keeps it
        print(format_layer_rows([r for r in rows.values() if r["dtype"] == name]) + "\n", flush=True)
    return list(rows.values())


def format_layer_rows(rows: list[dict[str, Any]]) -> str:
    timings = [t for t in ("kernels", "graph") if f"{t}_ms" in rows[0]]
    heads = {"kernels": "kernels ms | x dense", "graph": "graph replay ms | x dense"}
    lines = [
        "| dtype | shape | tokens | method | backend (ran) | " + " | ".join(heads[t] for t in timings)
        + " | resident / dense |",
        "|---|---|---:|---|---|" + "---:|---:|" * len(timings) + "---:|",
    ]  # fmt: skip
    for r in rows:
        ran = r["backend"] if r["ran"] == r["backend"] else f"{r['backend']} ({r['ran']})"
        cells = " | ".join(f"{r[f'{t}_ms']:.4f} | {r[f'{t}_vs_dense']:.2f}x" for t in timings)
        lines.append(
            f"| {r['dtype']} | {r['shape']} | {r['batch']} | {r['method']} | {ran} | {cells} | "
            f"{r['resident_vs_dense']:.4f} |"
        )
    return "\n".join(lines)


def random_llama(config: str, dtype: torch.dtype, device: str) -> nn.Module:
    """A randomly initialised Llama of the named shapes, built on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODEL_CONFIGS[config], max_position_embeddings=4096)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    model.generation_config.eos_token_id = None
    return model


def pruned_layers(model: nn.Module, kind: str, seed: int = 0) -> dict[str, nn.Module]:
    """Packed twins of every decoder linear: 2:4 by magnitude, ARMOR with near-identity blocks of the default
    budget around that core (random weights: the timing does not depend on the values)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = {}
    for name, lin in model.named_modules():
        if not (isinstance(lin, nn.Linear) and name.startswith("model.layers.")):
            continue
        w = lin.weight.detach()
        mask = nm_mask_from_scores(w.abs())
        a = b = None
        bo = bi = None
        if kind == "armor":
            bo, bi = budget_block_sizes(*w.shape)
            eye_o, eye_i = torch.eye(bo, device=w.device), torch.eye(bi, device=w.device)
            a = eye_o + 0.05 * torch.randn(w.shape[0] // bo, bo, bo, device=w.device, generator=gen)
            b = eye_i + 0.05 * torch.randn(w.shape[1] // bi, bi, bi, device=w.device, generator=gen)
        res = PruneResult(kind, w.float() * mask, mask, 0.0, 0.0, a_blocks=a, b_blocks=b, block_size_out=bo,
                          block_size_in=bi)  # fmt: skip
        out[name] = module_from_result(res, lin.bias, w.dtype)
    return out


def _swap(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``layers`` into ``model`` by name; returns the modules they replaced."""
    old = {}
    for name, mod in layers.items():
        parent, _, leaf = name.rpartition(".")
        old[name] = getattr(model.get_submodule(parent), leaf)
        setattr(model.get_submodule(parent), leaf, mod)
    return old


def model_rows(config: str, dtype: torch.dtype, batches: tuple[int, ...], steps: int, repeats: int) -> list[dict]:
    """Decode tokens/s (graph-captured on CUDA), weights bytes and peak memory: dense, 2:4 and ARMOR."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(config, dtype, device)
    variants = {"dense": None, "2:4": pruned_layers(model, "sparse"), "armor": pruned_layers(model, "armor", 1)}
    rows = []
    for kind, layers in variants.items():
        old = _swap(model, layers) if layers else None
        weights = model_resident_bytes(model)
        for batch in batches:
            ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)
            # the other variants' layers wait on the device too: their bytes are not this model's peak
            aside = torch.cuda.memory_allocated() - weights if device == "cuda" else 0
            try:
                r = time_decode_steps(model, ids, steps, repeats=repeats)
            except Exception as exc:  # noqa: BLE001 - a capture that fails is reported; the eager row stands in
                if isinstance(exc, getattr(torch, "AcceleratorError", ())):
                    raise  # a device-side fault leaves the CUDA context unusable: no eager row can follow
                print(f"model {kind} batch {batch}: capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                r = time_decode_steps(model, ids, steps, capture=False, repeats=repeats)
            if r["peak_mem_bytes"] is not None:
                r["peak_mem_bytes"] -= aside
            rows.append({"model": config, "kind": kind, "dtype": str(dtype).replace("torch.", ""),
                         "weights_bytes": weights, **r})  # fmt: skip
            print(f"model {kind} batch {batch}: {r['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        if old:
            _swap(model, old)
    dense = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["kind"] == "dense"}
    for r in rows:
        r["vs_dense"] = r["decode_tokens_per_s"] / dense[r["batch"]]
    return rows


def format_model_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | kind | dtype | batch | graph-captured | replays = eager tokens | decode tokens/s | x dense "
        "| weights | peak GPU memory |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['dtype']} | {r['batch']} | {r['captured']} | "
            f"{'-' if r['matches_eager'] is None else r['matches_eager']} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['vs_dense']:.2f}x | {fmt_bytes(r['weights_bytes'])} | "
            f"{fmt_bytes(r['peak_mem_bytes'])} |"
        )
    return "\n".join(lines)


def _use_tiles(path: str) -> None:
    """Replace the packed kernel's tiling table by the best tilings of a tile sweep's rows."""
    from armor.runtime import gpu_kernels
    from gpu_tune import best_tiles  # benchmarks/ is on sys.path when this file runs as a script

    with open(path) as fh:
        nm, bd = best_tiles(json.load(fh))
    gpu_kernels.NM_TILES.update(nm)
    gpu_kernels.BD_TILES.update(bd)
    print(f"tilings from {path}: {gpu_kernels.NM_TILES} {gpu_kernels.BD_TILES}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write every row as JSON here")
    p.add_argument("--layers-only", action="store_true")
    p.add_argument("--models-only", action="store_true")
    p.add_argument("--dtypes", default="float16,bfloat16", help="layer table dtypes, comma list")
    p.add_argument("--model-dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--model-config", default="llama2-7b", choices=list(MODEL_CONFIGS))
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=20, help="calls / replays per layer point; model runs: 3")
    p.add_argument("--timings", default="kernels,graph", help="layer timings, comma list: kernels, graph")
    p.add_argument("--tiles", default=None, help="a benchmarks/gpu_tune.py --out JSON: use its best tilings")
    args = p.parse_args(argv)
    if args.tiles:
        _use_tiles(args.tiles)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    command = " ".join(["python benchmarks/gpu_runtime.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# GPU runtime benchmark: {result['device']}\n\n`{command}`\n")
    if not args.models_only:
        timings = tuple(args.timings.split(","))
        result["layers"] = layer_rows(args.dtypes.split(","), TOKENS, args.repeats, timings)
    if not args.layers_only:
        result["models"] = model_rows(args.model_config, DTYPES[args.model_dtype], (1, 16), args.steps, 3)
        print(format_model_rows(result["models"]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
