"""Proxy loss against wall time: faithful ARMOR (the paper's schedule) vs the fast solver, on real SmolLM2 layers.

    python benchmarks/solver.py --threads 1 --faithful-iters 20000 --out benchmarks/solver_traces

Calibration: ``--nsamples`` sequences of ``--seqlen`` tokens of the Britannica text through the dense model, the
Hessian diagonals of the chosen layers of block ``--block`` (cached under the armor cache folder).  Both solvers
run on the same thread count; the table reports, per layer, the faithful loss after its iterations, the time the
fast solver needs to reach that loss (and its share of the faithful time), and both losses at equal wall time.
Also prints every method's loss and ARMOR's loss after 0/100/1,000 iterations (``--table methods``).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import armor
from armor import data
from armor.factors import normalize_weight, proxy_loss
from armor.solvers import baselines
from armor.solvers.armor import ArmorProblem
from armor.solvers.armor_fast import armor_fast
from armor.sparsity import nm_mask_from_scores

try:
    from armor.solvers.armor_blockhess import armor_blockhess
    from armor.stats import diagonal_blocks
except ImportError:  # an older armor (the "before" rows of RESULTS_solver.md): only --table budget runs
    armor_blockhess = diagonal_blocks = None

LAYERS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


# Llama-2-7B layer shapes (out, in) for --shapes llama7b: no 7B weights are at hand, so these layers are synthetic
LLAMA7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def synthetic_7b_stats(device: str) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights at the Llama-2-7B shapes and statistics of random heavy-tailed inputs (a few input
    channels 10-100x larger, as in LLM activations); for timing the solvers at full size, not for quality."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for short, (rows, cols) in LLAMA7B.items():
        w = torch.randn(rows, cols, generator=gen) * 0.02
        scale = torch.exp(torch.randn(cols, generator=gen) * 0.8)
        scale[torch.randperm(cols, generator=gen)[: cols // 200]] *= 30.0
        x = (torch.randn(4096, cols, generator=gen) * scale).to(device)
        hess = x.T @ x / x.shape[0]
        out[short] = {"weight": w.to(device), "h": hess.diagonal().clone(), "H": hess}
    return out


def layer_stats(
    block: int, nsamples: int, seqlen: int, shapes: str = "smollm2", device: str = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """Weights, Hessian diagonals ``h`` and full Hessians ``H`` of ``LAYERS`` in decoder block ``block``
    (cached), on ``device``; ``shapes="llama7b"``: synthetic layers at the 7B shapes instead
    (:func:`synthetic_7b_stats`)."""
    if shapes == "llama7b":
        return synthetic_7b_stats(device)
    # "True" in the key: the cache files written when the full Hessian was optional stay valid
    key = hashlib.sha1(f"{block}-{nsamples}-{seqlen}-True-{sorted(LAYERS)}".encode()).hexdigest()[:12]
    cache = data.cache_dir() / "bench" / f"smollm2-layers-{key}.safetensors"
    if cache.exists():
        flat = load_file(cache)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = data.default_model_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok(data.default_text("britannica"), return_tensors="pt").input_ids[0]
        if ids.numel() < nsamples * seqlen:
            raise SystemExit(f"the Britannica text has {ids.numel()} tokens, fewer than {nsamples} x {seqlen}")
        batch = ids[: nsamples * seqlen].reshape(nsamples, seqlen)
        mods = dict(model.named_modules())
        accs, hooks = {}, []
        for short, suffix in LAYERS.items():
            lin = mods[f"model.layers.{block}.{suffix}"]
            accs[short] = armor.StatsAccumulator(lin.in_features, full=True)
            hooks.append(lin.register_forward_hook(lambda _m, inp, _o, a=accs[short]: a.update(inp[0])))
        with torch.no_grad():
            for i in range(0, nsamples, 4):
                model(batch[i : i + 4])
        flat = {}
        for short, suffix in LAYERS.items():
            st = accs[short].finalize()
            flat[f"{short}.weight"] = mods[f"model.layers.{block}.{suffix}"].weight.detach().contiguous()
            flat[f"{short}.h"] = st.hessian_diag
            flat[f"{short}.H"] = st.hessian
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file(flat, tmp)
        tmp.replace(cache)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        short, field = name.split(".")
        out.setdefault(short, {})[field] = t.to(device)
    return out


def traced(weight, stats, method: str, **opts) -> tuple[armor.PruneResult, list[tuple[float, float]]]:
    """Run a solver and record (seconds since start, best loss) at every iteration/sweep."""
    trace: list[tuple[float, float]] = []
    start = time.perf_counter()

    def record(_it: int, loss: float) -> None:
        trace.append((time.perf_counter() - start, loss))

    res = armor.prune_layer(weight, stats, method, callback=record, **opts)
    return res, [(0.0, res.nowag_loss)] + trace


def loss_at(trace: list[tuple[float, float]], seconds: float) -> float:
    """Best loss reached by ``seconds`` on a trace."""
    i = bisect.bisect_right([t for t, _ in trace], seconds) - 1
    return trace[max(i, 0)][1]


def time_to(trace: list[tuple[float, float]], loss: float) -> float | None:
    return next((t for t, value in trace if value <= loss), None)


def compare(args: argparse.Namespace) -> None:
    layers = layer_stats(args.block, args.nsamples, args.seqlen, args.shapes, args.device)
    rows, raw = [], {}
    for short in args.layers:
        w, h = layers[short]["weight"], layers[short]["h"]
        if args.reuse_faithful:  # a faithful trace from an earlier run of this script (same layer, same threads)
            old = json.loads((Path(args.reuse_faithful) / f"{short}.json").read_text())
            faithful_trace = [tuple(x) for x in old["traces"][short]["faithful"]]
            prev = next(r for r in old["rows"] if r["layer"] == short)
            faithful_loss, faithful_iters, nowag = prev["faithful_loss"], prev["faithful_iters"], prev["nowag"]
            if args.rate_iters:
                # the machine's load may differ from the earlier run: time a few faithful iterations now and put
                # the reused trace on the same clock as the fast run that follows
                probe, probe_trace = traced(w, h, "armor", iterations=args.rate_iters, patience=0)
                scale = (probe_trace[-1][0] / probe.iterations) / (faithful_trace[-1][0] / faithful_iters)
                print(f"{short}: faithful clock rescaled by {scale:.3f} (s/iter now vs in the reused run)")
                faithful_trace = [(t * scale, loss) for t, loss in faithful_trace]
        else:
            faithful, faithful_trace = traced(w, h, "armor", iterations=args.faithful_iters, patience=0)
            faithful_loss, faithful_iters, nowag = faithful.loss, faithful.iterations, faithful.nowag_loss
        t_faithful = faithful_trace[-1][0]
        budget = args.fast_budget * t_faithful
        fast, fast_trace = traced(w, h, "armor-fast", sweeps=1_000_000, patience=0, max_seconds=budget)
        t5 = 0.05 * t_faithful
        reach = time_to(fast_trace, faithful_loss)
        fast_at_5 = loss_at(fast_trace, t5)
        sweeps_at_5 = sum(1 for t, _ in fast_trace[1:] if t <= t5)
        faithful_at_5 = loss_at(faithful_trace, t5)
        rows.append(
            {
                "layer": short,
                "shape": "x".join(map(str, w.shape)),
                "nowag": nowag,
                "faithful_iters": faithful_iters,
                "faithful_loss": faithful_loss,
                "faithful_s": t_faithful,
                "fast_sweeps_at_5pct": sweeps_at_5,
                "fast_loss_at_5pct": fast_at_5,
                "faithful_loss_at_5pct": faithful_at_5,
                "fast_lower_by_at_5pct": 1 - fast_at_5 / faithful_at_5,
                "fast_at_5pct_over_faithful_final": fast_at_5 / faithful_loss,
                "fast_s_to_faithful_loss": reach,
                "share_of_faithful_time": None if reach is None else reach / t_faithful,
                "fast_budget_s": budget,
                "fast_loss_at_budget": fast.loss,
                "fast_sweeps_at_budget": fast.iterations,
            }
        )
        raw[short] = {
            "fast": fast_trace,
            "faithful": faithful_trace[:: max(1, len(faithful_trace) // 400)] + [faithful_trace[-1]],
        }
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{short}.json").write_text(json.dumps({"rows": [rows[-1]], "traces": raw}))
    print(f"\nthreads={torch.get_num_threads()} block={args.block} calib={args.nsamples}x{args.seqlen}\n")
    print(
        "| layer | shape | NoWag-P | faithful: iters, s, loss | at 5% of faithful time: faithful / fast "
        "(sweeps) / fast lower by | fast at 5% ÷ faithful final | fast time to faithful final "
        f"(share) | fast after {args.fast_budget:.0%} of faithful time (sweeps) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        reach = (
            "not reached"
            if r["fast_s_to_faithful_loss"] is None
            else f"{r['fast_s_to_faithful_loss']:.1f} s ({100 * r['share_of_faithful_time']:.1f}%)"
        )
        print(
            f"| {r['layer']} | {r['shape']} | {r['nowag']:.5f} | {r['faithful_iters']}, {r['faithful_s']:.0f} s, "
            f"{r['faithful_loss']:.5f} | {r['faithful_loss_at_5pct']:.5f} / {r['fast_loss_at_5pct']:.5f} "
            f"({r['fast_sweeps_at_5pct']}) / {100 * r['fast_lower_by_at_5pct']:.0f}% | "
            f"{r['fast_at_5pct_over_faithful_final']:.2f}x | {reach} | {r['fast_loss_at_budget']:.5f} "
            f"({r['fast_sweeps_at_budget']}) |"
        )


def methods_table(args: argparse.Namespace) -> None:
    layers = layer_stats(args.block, args.nsamples, args.seqlen, args.shapes, args.device)
    print(
        "| layer | shape | magnitude | Wanda | SparseGPT | NoWag-P | ARMOR 100 it | ARMOR 1,000 it | s/it | "
        "armor-fast (sweeps, s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for short in args.layers:
        w, st = layers[short]["weight"], armor.LayerStats(layers[short]["h"], layers[short]["H"])
        base = {m: armor.prune_layer(w, st, m).loss for m in ("magnitude", "wanda", "sparsegpt", "nowag")}
        faithful, trace = traced(w, st, "armor", iterations=1000, patience=0)
        fast = armor.prune_layer(w, st, "armor-fast", sweeps=args.fast_sweeps, patience=0)
        per_it = trace[-1][0] / faithful.iterations
        print(
            f"| {short} | {'x'.join(map(str, w.shape))} | {base['magnitude']:.5f} | {base['wanda']:.5f} | "
            f"{base['sparsegpt']:.5f} | {base['nowag']:.5f} | {faithful.history[100]:.5f} | "
            f"{faithful.history[1000]:.5f} | {per_it:.4f} | {fast.loss:.5f} ({fast.iterations}, "
            f"{fast.seconds:.1f} s) |"
        )


def budget_table(args: argparse.Namespace) -> None:
    """armor-fast per layer with the given options (default: the budgeted block sizes): seconds and loss."""
    layers = layer_stats(args.block, args.nsamples, args.seqlen, args.shapes, args.device)
    opts = json.loads(args.fast_opts)
    print(f"armor {armor.__file__}; options {opts}; threads {torch.get_num_threads()}; device {args.device}")
    print("| layer | shape | blocks (out, in) | wrapper overhead | sweeps | seconds | loss | loss / NoWag-P |")
    print("|---|---|---|---|---|---|---|---|")
    total = 0.0
    for short in args.layers:
        w, h = layers[short]["weight"], layers[short]["h"]
        start = time.perf_counter()
        res = armor.prune_layer(w, h, "armor-fast", **opts)
        secs = time.perf_counter() - start
        total += secs
        bo, bi = res.block_size_out, res.block_size_in
        overhead = (bo * w.shape[0] + bi * w.shape[1]) / w.numel()
        print(
            f"| {short} | {'x'.join(map(str, w.shape))} | {bo}, {bi} | {100 * overhead:.1f}% | {res.iterations} | "
            f"{secs:.2f} | {res.loss:.5f} | {res.loss / res.nowag_loss:.3f} |",
            flush=True,
        )
    print(f"total {total:.1f} s")


def objectives_table(args: argparse.Namespace) -> None:
    """armor-fast (the paper's diagonal proxy) vs armor-bh (block-Hessian proxy) per layer, default budget:
    the loss of each result under both proxies and its true output error with the full ``X^T X``."""
    layers = layer_stats(args.block, args.nsamples, args.seqlen, args.shapes, args.device)
    opts = json.loads(args.fast_opts)
    print(f"options {opts}; threads {torch.get_num_threads()}")
    print("| layer | objective | seconds | diagonal proxy | block-Hessian proxy | true output error |")
    print("|---|---|---|---|---|---|")
    for short in args.layers:
        w, h, full_h = layers[short]["weight"].float(), layers[short]["h"], layers[short]["H"]
        wn, r, c = normalize_weight(w)
        mask = nm_mask_from_scores(baselines.nowag_scores(wn, h))
        for objective in ("diagonal", "block-Hessian"):
            start = time.perf_counter()
            if objective == "diagonal":
                res = armor_fast(wn, h, mask, r, c, **opts)
            else:
                res = armor_blockhess(wn, h, mask, r, c, hessian=full_h, **opts)
            secs = time.perf_counter() - start
            bo, bi = res.block_size_out, res.block_size_in
            bh_problem = ArmorProblem(wn, h, bo, bi, h_blocks=diagonal_blocks(bi, full_h))
            a = res.a_blocks / r.reshape(-1, bo, 1)
            b = res.b_blocks / c.reshape(-1, 1, bi)
            e = bh_problem.left(a, bh_problem.right(res.core, b)) - wn
            diag_loss = float(proxy_loss(e + wn, wn, h))
            d = res.dense_weight() - w
            true_err = float(torch.einsum("ij,jk,ik->", d, full_h, d) / torch.einsum("ij,jk,ik->", w, full_h, w))
            print(
                f"| {short} | {objective} | {secs:.2f} | {diag_loss:.5f} | {bh_problem.loss_of_residual(e):.5f} | "
                f"{true_err:.5f} |",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=["compare", "methods", "budget", "objectives"], default="compare")
    p.add_argument("--fast-opts", default="{}", help="--table budget: armor-fast options as JSON")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--block", type=int, default=10, help="decoder block whose layers are used")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--faithful-iters", type=int, default=20_000)
    p.add_argument("--fast-sweeps", type=int, default=40, help="armor-fast sweeps in --table methods")
    p.add_argument(
        "--fast-budget", type=float, default=0.25, help="armor-fast wall time as a fraction of the faithful time"
    )
    p.add_argument("--reuse-faithful", default=None, help="folder of an earlier --out: reuse its faithful traces")
    p.add_argument(
        "--rate-iters", type=int, default=0, help="with --reuse-faithful: rescale its clock by this many iterations now"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the solvers run: cpu or cuda (timings sync every sweep)")
    p.add_argument(
        "--shapes",
        choices=["smollm2", "llama7b"],
        default="smollm2",
        help="real SmolLM2 layers, or synthetic layers at the Llama-2-7B shapes (timing only)",
    )
    p.add_argument("--out", default=None, help="folder for one JSON per layer (row + loss-vs-time traces)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tables = {"compare": compare, "methods": methods_table, "budget": budget_table, "objectives": objectives_table}
    tables[args.table](args)


if __name__ == "__main__":
    main()
