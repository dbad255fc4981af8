"""Tile sweep of the Triton kernels (needs a CUDA GPU and triton): the tables behind
``armor.runtime.gpu_kernels.NM_TILES`` and ``BD_TILES``.

    python benchmarks/gpu_tune.py --out benchmarks/gpu_tune.json > benchmarks/gpu_tune.md

Packed 2:4 core (``nm_matmul_triton``) on the three Llama-2-7B shapes at 1, 16 and 64 tokens (the token tiles
1, 16 and 64).  Stage 1 sweeps output rows x input columns per program (4 warps, 3 stages) for each form of
``armor.runtime.gpu_kernels.EXPANDS`` that suits the token count (the weight-tile forms everywhere, the
activation forms at one token); stage 2 sweeps warps x pipelining stages around each form's best, stage 3
splits its input across 2, 4 and 8 programs per row tile.  Block-diagonal wrappers (``block_diag_matmul_triton``,
ARMOR's default blocks of 128 on 4096 and 11008 features) at 1 and 64 tokens: output x input features per
program.  Every call is timed by ``triton.testing.do_bench`` (median, the L2 cache flushed before each call)
against dense ``F.linear`` of the same layer timed the same way; each tiling is ranked by the geometric mean
of its speed-up.  ``--seconds`` caps the whole sweep: once spent, no further tiling is timed, the tables rank
what was measured, and ``--out`` (written after every token count) keeps it for ``--tiles`` of the benchmarks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from armor.bench.layers import SHAPE_SETS, random_nm_result
from armor.runtime import module_from_result
from armor.runtime.gpu_kernels import BDTile, NMTile, block_diag_matmul_triton, nm_matmul_triton

NM_TOKENS = (1, 16, 64)
BD_TOKENS = (1, 64)
ROWS, COLUMNS, WARPS, STAGES, SPLITS = (16, 32, 64), (128, 256, 512), (2, 4, 8), (2, 4), (2, 4, 8)
X_COLUMNS = (64, 128, 256)  # kept entries per step of the activation-select forms
BD_ROWS, BD_COLUMNS = (16, 32, 64), (32, 64, 128)
#: ``time.monotonic()`` after which no further tiling is timed (``--seconds``)
deadline = math.inf


def _median_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def _nm_layers(dtype: torch.dtype) -> list[dict]:
    """The three shapes' packed 2:4 layers on the GPU, with their dense weight."""
    out = []
    for out_f, in_f in SHAPE_SETS["llama7b"]:
        mod = module_from_result(random_nm_result(out_f, in_f, None, seed=0), None, dtype, device="cuda")
        out.append({"shape": f"{out_f}x{in_f}", "mod": mod, "w": mod.dense_weight().to(dtype), "in": in_f})
    return out


def _time(kernel: str, layer: dict, tokens: int, tiles: list, dense: dict) -> list[dict]:
    """ms of ``kernel`` (nm or bd) at every tiling on one layer (tilings that fail are reported, skipped)."""
    w = layer["w"]
    x = torch.randn(tokens, layer["in"], device="cuda", dtype=w.dtype)
    key = (kernel, layer["shape"], tokens)
    if key not in dense:
        dense[key] = _median_ms(partial(F.linear, x, w))
    ref = F.linear(x.double(), w.double())
    rows = []
    for tile in tiles:
        if kernel == "nm":
            fn = partial(nm_matmul_triton, layer["mod"].values, layer["mod"].indices, x, 2, 4, tile=tile)
        else:
            fn = partial(block_diag_matmul_triton, layer["blocks"], x, tile=tile)
        try:
            err = ((fn().double() - ref).norm() / ref.norm()).item()
            ms = _median_ms(fn)
        except Exception as exc:  # noqa: BLE001 - a tiling the GPU cannot run is reported and skipped
            print(f"skip {kernel} {tile} {tokens} tokens: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
            continue
        rows.append({"kernel": kernel, "shape": layer["shape"], "tokens": tokens, "tile": list(tile), "ms": ms,
                     "dense_ms": dense[key], "x_dense": dense[key] / ms, "rel_error": err})  # fmt: skip
    return rows


def _time_all(kernel: str, layers: list[dict], tokens: int, tiles: list, dense: dict) -> list[dict]:
    """:func:`_time` of every tiling on every layer, each tiling on all layers before the next, so that a sweep
    cut short by :data:`deadline` still ranks whole tilings; none is started after it."""
    rows = []
    for i, tile in enumerate(tiles):
        if time.monotonic() > deadline:
            print(f"time budget spent: {len(tiles) - i} {kernel} tilings at {tokens} tokens not timed",
                  file=sys.stderr, flush=True)  # fmt: skip
            break
        rows += [row for layer in layers for row in _time(kernel, layer, tokens, [tile], dense)]
    return rows


def _ranked(rows: list[dict], kernel: str, tokens: int) -> list[tuple[float, tuple, dict]]:
    """(geometric mean of x dense over the shapes, tiling, rows by shape), best first; complete tilings only."""
    mine = [r for r in rows if r["kernel"] == kernel and r["tokens"] == tokens]
    shapes = set(r["shape"] for r in mine)
    by_tile: dict[tuple, dict] = {}
    for r in mine:
        by_tile.setdefault(tuple(r["tile"]), {})[r["shape"]] = r
    ranked = [
        (math.exp(sum(math.log(p["x_dense"]) for p in per.values()) / len(per)), tile, per)
        for tile, per in by_tile.items()
        if set(per) == shapes
    ]
    return sorted(ranked, key=lambda t: -t[0])


def _first_tiles(tokens: int) -> list[NMTile]:
    """Stage 1: rows x columns for each form that suits ``tokens`` (the activation forms are one-token forms);
    tiles of more than 16K weights or kept entries spill registers and are left out."""
    weight_form = "join" if tokens <= 16 else "gather"
    tiles = [NMTile(r, c, 4, 3, weight_form) for r, c in itertools.product(ROWS, COLUMNS) if r * c <= 16384]
    if tokens == 1:
        forms = ("xselect", "xgather")
        tiles += [NMTile(r, c, 4, 3, f) for f, r, c in itertools.product(forms, ROWS, X_COLUMNS) if r * c <= 16384]
    return tiles


def _best_per_form(rows: list[dict], tokens: int) -> list[NMTile]:
    """The best measured tiling of each form, best form first."""
    best: dict[str, NMTile] = {}
    for _, tile, _ in _ranked(rows, "nm", tokens):
        tile = nm_tile_of_row(tile)
        best.setdefault(tile.expand, tile)
    return list(best.values())


def sweep_nm(dtype: torch.dtype, checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Stage 1 (:func:`_first_tiles`), then around each form's best: stage 2 warps x stages, stage 3 splits;
    ``checkpoint(rows)`` after each token count."""
    layers, dense, rows = _nm_layers(dtype), {}, []
    for tokens in NM_TOKENS:
        tried = _first_tiles(tokens)
        rows += _time_all("nm", layers, tokens, tried, dense)
        for vary in (
            lambda t: [t._replace(warps=nw, stages=ns) for nw, ns in itertools.product(WARPS, STAGES)],
            lambda t: [t._replace(split=k) for k in SPLITS],
        ):
            todo = [t for best in _best_per_form(rows, tokens) for t in vary(best) if t not in tried]
            rows += _time_all("nm", layers, tokens, todo, dense)
            tried += todo
        print(f"nm {tokens} tokens: done", file=sys.stderr, flush=True)
        if checkpoint is not None:
            checkpoint(rows)
    return rows


def sweep_bd(dtype: torch.dtype, checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    dense, rows = {}, []
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for features in (4096, 11008):
        blocks = torch.randn(features // 128, 128, 128, device="cuda", generator=gen).to(dtype)
        w = torch.block_diag(*blocks)
        layers.append({"shape": f"{features} in blocks of 128", "blocks": blocks, "w": w, "in": features})
    tiles = [BDTile(r, c, 4) for r, c in itertools.product(BD_ROWS, BD_COLUMNS)]
    for tokens in BD_TOKENS:
        rows += _time_all("bd", layers, tokens, tiles, dense)
        print(f"bd {tokens} tokens: done", file=sys.stderr, flush=True)
        if checkpoint is not None:
            checkpoint(rows)
    return rows


def nm_tile_of_row(fields: list | tuple) -> NMTile:
    """An ``NMTile`` from a row's ``tile`` list; rows of earlier sweeps end in a ``join`` flag (True: "join",
    False: "gather") where the form's name now stands, and have no split."""
    fields = list(fields)
    if isinstance(fields[4], bool):
        fields[4] = "join" if fields[4] else "gather"
    return NMTile(*fields)


def best_tiles(result: dict) -> tuple[dict[int, NMTile], dict[int, BDTile]]:
    """The ``NM_TILES`` and ``BD_TILES`` entries a sweep calls for, keyed by token tile."""
    rows = result["rows"]
    nm = {t: nm_tile_of_row(_ranked(rows, "nm", t)[0][1]) for t in NM_TOKENS if _ranked(rows, "nm", t)}
    bd = {max(16, t): BDTile(*_ranked(rows, "bd", t)[0][1]) for t in BD_TOKENS if _ranked(rows, "bd", t)}
    return nm, bd


def ranking(rows: list[dict], kernel: str, tokens_list: tuple[int, ...], head: str, top: int = 6) -> str:
    """Per token count, the ``top`` tilings by the geometric mean of x dense over the shapes."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["kernel"] == kernel))
    cols = " | ".join(f"{s}: x dense (us)" for s in shapes)
    lines = [f"| tokens | {head} | geomean x dense | {cols} | max rel. error |",
             "|" + "---:|" * (3 + len(shapes) + 1)]  # fmt: skip
    for tokens in tokens_list:
        for gm, tile, per in _ranked(rows, kernel, tokens)[:top]:
            cells = " | ".join(f"{per[s]['x_dense']:.2f}x ({per[s]['ms'] * 1e3:.1f})" for s in shapes)
            err = max(p["rel_error"] for p in per.values())
            lines.append(f"| {tokens} | {tuple(tile)} | {gm:.2f}x | {cells} | {err:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write every row as JSON here")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--seconds", type=float, default=math.inf, help="time budget: no tiling is timed after it")
    args = p.parse_args(argv)
    global deadline
    deadline = time.monotonic() + args.seconds
    dtype = getattr(torch, args.dtype)
    result = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": []}
    for sweep in (sweep_nm, sweep_bd):
        done = list(result["rows"])

        def checkpoint(rows: list[dict], done: list[dict] = done) -> None:
            result["rows"] = done + rows
            if args.out:  # a run stopped later keeps what it measured
                with open(args.out, "w") as fh:
                    json.dump(result, fh, indent=1)

        try:
            checkpoint(sweep(dtype, checkpoint))
        except Exception as exc:  # noqa: BLE001 - keep the other sweep's rows
            print(f"{sweep.__name__} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    command = " ".join(["python benchmarks/gpu_tune.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# Triton kernel tile sweep: {result['device']}, {args.dtype}\n\n`{command}`\n")
    nm_head = "(rows, columns, warps, stages, form, split)"
    print("Packed 2:4 core:\n\n" + ranking(result["rows"], "nm", NM_TOKENS, nm_head))
    print("\nBlock-diagonal wrappers:\n\n" + ranking(result["rows"], "bd", BD_TOKENS, "(rows, columns, warps)"))
    print(f"\nNM_TILES, BD_TILES = {best_tiles(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
