"""Peak resident memory of pruning SmolLM2: streaming (one block at a time) vs whole model in memory.

    python benchmarks/memory.py --method nowag --nsamples 16 --seqlen 512 --threads 1 --out /tmp/armor-mem

runs each mode in its own process under ``/usr/bin/time -v`` and reads "Maximum resident set size" (the
peak RSS of that process), then checks that both runs produced identical per-layer results.  Both modes use
the same calibration (the embedded Britannica text, ``--nsamples`` x ``--seqlen`` tokens, seed 0, batch
``--batch-size``), the same method and options, float32 weights, and save the pruned model
(``armor.load``-able) to ``<out>/<mode>``.  One mode alone: ``python benchmarks/memory.py --run streaming
...`` (what the driver times).

    python benchmarks/memory.py --footprint 2048x2048 --sweeps 2 --threads 1

measures the working set of the armor-fast solver on one random ``m x n`` layer instead: the peak RSS of a
process that prunes it minus that of one that only builds the same weight and statistics, in units of one
``m x n`` float32 matrix, plus the seconds per sweep (used by docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run_mode(args: argparse.Namespace) -> None:
    """Prune SmolLM2 once in ``args.run`` mode (the process that /usr/bin/time measures)."""
    import torch

    from armor.data import default_model_path, default_text_path
    from armor.model import load_model, load_tokenizer, method_options, prune_pretrained, read_documents
    from armor.model.pipeline import calibration_ids

    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    docs = read_documents(default_text_path("britannica"))
    ids = calibration_ids(tokenizer, docs, args.nsamples, args.seqlen, seed=0)
    opts = method_options(args.method, iterations=args.iterations, block_size=args.block_size, seed=0)
    out = Path(args.out) / args.run
    start = time.perf_counter()
    if args.run == "baseline":  # imports, tokenizer, calibration ids and the meta skeleton: the fixed cost
        from armor.distributed.streaming import _skeleton

        _skeleton(path)
        print(json.dumps({"mode": "baseline", "layers": 0, "seconds": 0.0, "mean_nowag_loss": float("nan"),
                          "mean_loss": float("nan")}))
        return
    if args.run == "whole":
        model = load_model(path)  # float32, as `armor prune` loads it
        run = prune_pretrained(model, tokenizer, ids, args.method, opts, out_dir=out,
                               batch_size=args.batch_size, resume=False, progress=False)
    else:
        from armor.distributed import prune_streaming

        run = prune_streaming(path, ids, args.method, opts, out_dir=out, tokenizer=tokenizer,
                              batch_size=args.batch_size, resume=False, progress=False,
                              activation_budget=args.activation_budget_mb << 20)
    nowag, final = run.mean_losses()
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"mode": args.run, "layers": len(run.records), "seconds": seconds,
                      "mean_nowag_loss": nowag, "mean_loss": final}))


def footprint_child(shape: str, sweeps: int, solve: bool, threads: int) -> None:
    """Build a random ``m x n`` layer (and, with ``solve``, prune it with armor-fast); print the timings."""
    import torch

    import armor

    torch.set_num_threads(threads)
    m, n = (int(v) for v in shape.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(m, n, generator=gen)
    h = torch.rand(n, generator=gen) + 0.1
    info: dict = {"shape": [m, n], "solve": solve}
    if solve:
        # patience=0: every sweep runs, so seconds/sweep is not diluted by an early stop
        res = armor.prune_layer(w, h, "armor-fast", sweeps=sweeps, patience=0, block_size=128)
        per_sweep = res.extras["solve_seconds"] / max(res.iterations, 1)
        info.update(sweeps=res.iterations, seconds_per_sweep=per_sweep, block_out=res.block_size_out,
                    block_in=res.block_size_in)
    print(json.dumps(info))


def _timed(cmd: list[str]) -> tuple[float, dict]:
    """Peak RSS (MiB) of ``cmd`` under /usr/bin/time -v and the JSON its last stdout line holds."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return peak_kb / 1024, json.loads(proc.stdout.strip().splitlines()[-1])


def footprint(args: argparse.Namespace) -> None:
    m, n = (int(v) for v in args.footprint.lower().split("x"))
    base = [sys.executable, __file__, "--footprint-child", args.footprint, "--sweeps", str(args.sweeps),
            "--threads", str(args.threads)]
    print("$ /usr/bin/time -v", shlex.join(base), "[--solve]", flush=True)
    base_mib, _ = _timed(base)
    solve_mib, info = _timed([*base, "--solve"])
    matrices = (solve_mib - base_mib) * 2**20 / (m * n * 4)
    print(json.dumps({**info, "peak_rss_base_mib": round(base_mib, 1),
                      "peak_rss_solve_mib": round(solve_mib, 1),
                      "working_set_in_mxn_fp32": round(matrices, 1)}))


def compare_layers(a: Path, b: Path) -> tuple[int, int]:
    """(layers compared, layers whose saved tensors differ) between two output folders."""
    import torch
    from safetensors import safe_open

    files = sorted((a / "layers").glob("*.safetensors"))
    differ = 0
    for fa in files:
        with safe_open(str(fa), "pt") as x, safe_open(str(b / "layers" / fa.name), "pt") as y:
            if sorted(x.keys()) != sorted(y.keys()) or any(
                not torch.equal(x.get_tensor(k), y.get_tensor(k)) for k in x.keys()  # noqa: SIM118
            ):
                differ += 1
    return len(files), differ


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", choices=("baseline", "whole", "streaming"), default=None, help="run one mode (internal)")
    p.add_argument("--method", default="nowag")
    p.add_argument("--iterations", type=int, default=None, help="ARMOR iterations / armor-fast sweeps")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--activation-budget-mb", type=int, default=2048,
                   help="streaming: activations kept in RAM")
    p.add_argument("--out", default="/tmp/armor-memory")
    p.add_argument("--footprint", default=None, metavar="MxN", help="solver working set on one m x n layer")
    p.add_argument("--footprint-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--solve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sweeps", type=int, default=2)
    args = p.parse_args()
    if args.footprint_child:
        footprint_child(args.footprint_child, args.sweeps, args.solve, args.threads)
        return 0
    if args.footprint:
        footprint(args)
        return 0
    if args.run:
        run_mode(args)
        return 0

    rows = []
    for mode in ("baseline", "whole", "streaming"):
        cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--run", mode]
        for k in ("method", "iterations", "block_size", "nsamples", "seqlen", "batch_size", "threads",
                  "activation_budget_mb", "out"):
            v = getattr(args, k)
            if v is not None:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        print("$", shlex.join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({**info, "peak_rss_mib": round(peak_kb / 1024, 1), "wall": wall})
        print(json.dumps(rows[-1]), flush=True)
    n, differ = compare_layers(Path(args.out) / "whole", Path(args.out) / "streaming")
    print("\n| mode | peak RSS (MiB) | wall | prune+calib s | mean NoWag-P loss | mean loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_rss_mib']:.0f} | {r['wall']} | {r['seconds']} | "
              f"{r['mean_nowag_loss']:.5f} | {r['mean_loss']:.5f} |")
    base, whole, stream = (r["peak_rss_mib"] for r in rows)
    print(f"\nstreaming / whole peak RSS: {stream / whole:.2f}; above the baseline process: "
          f"{(stream - base) / (whole - base):.2f}; per-layer results identical: {n - differ}/{n} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
