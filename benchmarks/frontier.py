"""Perplexity against stored bytes on SmolLM2-135M-Instruct: every method, ARMOR at several wrapper budgets.

Shells out to the ``armor`` command once per run (one at a time: the machine has 2 cores), keeps each run's
``results.json`` under ``--runs``, and collects them into a Markdown table and a PNG (perplexity on a log scale
against the stored bytes of the pruned linear layers relative to dense).  A run whose ``results.json`` already
exists is not repeated, so the script can be stopped and resumed.

    python benchmarks/frontier.py --runs /tmp/frontier                      # every run, then the table + PNG
    python benchmarks/frontier.py --runs /tmp/frontier --only armor-fast-b6.25 baselines-one-pass
    python benchmarks/frontier.py --runs /tmp/frontier --collect-only       # table + PNG from what exists

Protocol: calibration 64 x 512 tokens of the Britannica text (seed 0), perplexity on the Lee
corpus in 147 windows of 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: the ``armor`` command of this interpreter's environment (works without activating the virtualenv)
ARMOR = str(Path(sys.executable).parent / "armor") if (Path(sys.executable).parent / "armor").exists() else "armor"
PROTOCOL = ["--nsamples", "64", "--seqlen", "512", "--eval-windows", "147", "--quiet"]
ARMOR_SWEEPS = ["-O", "sweeps=20"]
#: the layer-wise runs (the paper's protocol); the "-recon" runs keep armor prune's default block-wise reconstruction
LAYERWISE = ["--no-reconstruct"]
#: the quality setting: twice the calibration sequences, four times the reconstruction steps
QUALITY = ["--nsamples", "128", "--reconstruct-steps", "128"]
#: rows measured earlier with this protocol (their results.json are not kept): plotted and tabled with the new ones
PREVIOUS = Path(__file__).with_name("frontier_rows.json")

#: name -> (extra CLI arguments, what the run is); ARMOR at several budgets, then the baselines, then the same with
#: block-wise reconstruction (armor prune's default settings).
RUNS: dict[str, tuple[list[str], str]] = {
    "armor-fast-b6.25": (["--method", "armor-fast", "--compare", "none", *ARMOR_SWEEPS], "ARMOR, default budget"),
    "armor-bh-b6.25": (
        ["--method", "armor-bh", "--compare", "none", *ARMOR_SWEEPS],
        "ARMOR block-Hessian objective, default budget",
    ),
    "armor-fast-seq-b6.25": (
        ["--method", "armor-fast", "--compare", "none", "--calibration-mode", "sequential", *ARMOR_SWEEPS],
        "ARMOR, sequential calibration, default budget",
    ),
    "armor-fast-calib128": (
        ["--method", "armor-fast", "--compare", "none", "--nsamples", "128"],
        "ARMOR, default budget, twice the calibration tokens (128 x 512)",
    ),
    "baselines-one-pass": (
        ["--method", "sparsegpt", "--compare", "magnitude,wanda,nowag"],
        "baselines, one-pass calibration",
    ),
    "baselines-sequential": (
        ["--method", "sparsegpt", "--compare", "wanda", "--calibration-mode", "sequential"],
        "SparseGPT and Wanda, sequential calibration (their papers' mode)",
    ),
    **{
        f"armor-fast-b{pct:g}": (
            ["--method", "armor-fast", "--compare", "none", "--wrapper-budget", str(pct / 100), *ARMOR_SWEEPS],
            f"ARMOR, budget {pct:g}%",
        )
        for pct in (2, 5, 10, 20, 40)
    },
}
RUNS = {name: ([*LAYERWISE, *args], what) for name, (args, what) in RUNS.items()}
RUNS.update({
    "armor-fast-b6.25-recon": (["--method", "armor-fast", "--compare", "none"], "ARMOR + reconstruction, default"),
    "baselines-recon": (["--method", "sparsegpt", "--compare", "wanda,nowag"], "baselines + reconstruction"),
    # the quality setting (RESULTS_reconstruction.md: the first under ppl 60), every method alike
    "armor-fast-calib128-recon": (
        ["--method", "armor-fast", "--compare", "none", *QUALITY],
        "ARMOR + reconstruction, 128 calibration sequences, 128 steps",
    ),
    "baselines-calib128-recon": (
        ["--method", "sparsegpt", "--compare", "wanda,nowag", *QUALITY],
        "baselines + reconstruction, 128 calibration sequences, 128 steps",
    ),
    **{
        f"armor-fast-b{pct:g}-recon": (
            ["--method", "armor-fast", "--compare", "none", "--wrapper-budget", str(pct / 100)],
            f"ARMOR + reconstruction, budget {pct:g}%",
        )
        for pct in (2, 10)
    },
})


def run(name: str, runs_dir: Path, model: str) -> None:
    out = runs_dir / name
    if (out / "results.json").exists():
        print(f"{name}: already done", flush=True)
        return
    # the dense model is evaluated once, in the first run (the default-budget ARMOR run)
    dense = [] if name == next(iter(RUNS)) else ["--no-dense-eval"]
    cmd = [ARMOR, "prune", "--model", model, "--output", str(out), *PROTOCOL, *dense, *RUNS[name][0]]
    print(f"{name}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(runs_dir / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    load = os.getloadavg()[0]
    print(f"{name}: rc={rc}, {time.perf_counter() - start:.0f} s (load average {load:.1f})", flush=True)
    if rc == 0:
        (out / "command.txt").write_text(shlex.join(cmd) + f"\n# wall {time.perf_counter() - start:.0f} s\n")


def collect(runs_dir: Path) -> list[dict]:
    """One row per (run, method) from every finished run (else from :data:`PREVIOUS`); the dense row once."""
    rows, dense_seen = [], False
    previous = json.loads(PREVIOUS.read_text()) if PREVIOUS.exists() else []
    for name in RUNS:
        if not (runs_dir / name / "results.json").exists():
            for row in previous:
                if row["run"] == name and (row["method"] != "dense" or not dense_seen):
                    dense_seen |= row["method"] == "dense"
                    rows.append(row)
        path = runs_dir / name / "results.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        cmd = (
            (runs_dir / name / "command.txt").read_text().splitlines()[0]
            if (runs_dir / name / "command.txt").exists()
            else ""
        )
        # the settings name the mode at the end of their calibration line ("..., seed 0, sequential")
        mode = data.get("settings", {}).get("calibration", "").rsplit(", ", 1)[-1] or "one-pass"
        for r in data["results"]:
            if r["method"] == "dense":
                if dense_seen:
                    continue
                dense_seen = True
            row = dict(r)
            row["run"], row["command"], row["mode"] = name, cmd, "–" if r["method"] == "dense" else mode
            row["reconstruction"] = "yes" if r.get("reconstruction") else "no"
            rows.append(row)
    return rows


def _f(x, digits=2, pct=False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | calibration | reconstruction | ppl (Lee, 147 x 512) | linear-layer bytes / dense | "
        "checkpoint bytes / dense | values kept | wrapper overhead | mean proxy loss (NoWag-P) | prune s | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.get("linear_bytes_ratio") or 1.0, r.get("ppl") or 0)):
        lines.append(
            f"| {r['method']} | {r['mode']} | {r.get('reconstruction', 'no')} | {_f(r.get('ppl'))} | "
            f"{_f(r.get('linear_bytes_ratio'), pct=True)} | "
            f"{_f(r.get('checkpoint_bytes_ratio'), pct=True)} | {_f(r.get('values_kept_ratio'), pct=True)} | "
            f"{_f(r.get('wrapper_overhead'), pct=True)} | {_f(r.get('mean_loss'), 4)} "
            f"({_f(r.get('mean_nowag_loss'), 4)}) | {_f(r.get('prune_seconds'), 0)} | {r['run']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    def on_budget_line(r: dict) -> bool:  # armor-fast one-pass at each budget; other ARMOR runs are markers
        return r["method"] == "armor-fast" and r["run"].startswith("armor-fast-b")

    for recon, style, label in (("no", "o-", ""), ("yes", "o--", " + block-wise reconstruction")):
        pts = sorted((r["linear_bytes_ratio"], r["ppl"]) for r in rows
                     if on_budget_line(r) and r.get("ppl") and r.get("reconstruction", "no") == recon)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"ARMOR (armor-fast){label}, one point per wrapper budget")
    for r in rows:
        if on_budget_line(r) or not r.get("ppl") or r.get("linear_bytes_ratio") is None:
            continue
        label = r["method"] if r["mode"] in ("one-pass", "–") else f"{r['method']} ({r['mode']})"
        if "calib128" in r["run"]:
            label += ", 128 x 512 calibration"
        if r.get("reconstruction") == "yes":
            label += " + reconstruction" + (", 128 steps" if "calib128" in r["run"] else "")
        marker = "*" if r["method"] == "dense" else ("^" if r["method"].startswith("armor") else "s")
        ax.plot(r["linear_bytes_ratio"], r["ppl"], marker, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("stored bytes of the linear layers / dense")
    ax.set_ylabel("perplexity, Lee corpus (log)")
    ax.set_title("SmolLM2-135M-Instruct, 2:4: perplexity vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: no point hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/frontier", help="folder of the runs' outputs")
    p.add_argument("--model", default=str(Path.home() / ".cache/armor/models/SmolLM2-135M-Instruct"))
    p.add_argument("--only", nargs="+", choices=list(RUNS), default=None)
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--png", default="benchmarks/frontier.png")
    args = p.parse_args()
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        for name in args.only or list(RUNS):
            run(name, runs_dir, args.model)
    rows = collect(runs_dir)
    if not rows:
        print("no finished runs", file=sys.stderr)
        return 1
    text = table(rows)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    plot(rows, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
