"""Markdown report and per-layer loss plot of an ``armor prune`` run."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "write_report", "plot_losses"]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: method, perplexity, mean NoWag-P / final proxy loss, pruning time."""
    head = "| method | ppl | mean NoWag-P loss | mean final loss | prune time (s) |\n" + "|---" * 5 + "|"
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r.get('ppl'))} | {_fmt(r.get('mean_nowag_loss'), 4)} | "
            f"{_fmt(r.get('mean_loss'), 4)} | {_fmt(r.get('prune_seconds'), 1)} |"
        )
    return "\n".join(lines)


def plot_losses(records: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path | None:
    """PNG of the proxy loss per layer: NoWag-P and each method's final loss.  ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(11, 4.5))
    nowag_done = False
    for method, recs in records.items():
        if not recs:
            continue
        x = list(range(len(recs)))
        if not nowag_done:
            ax.plot(x, [r["nowag_loss"] for r in recs], color="0.45", lw=1.2, label="NoWag-P (start)")
            nowag_done = True
        if method != "nowag":
            ax.plot(x, [r["loss"] for r in recs], lw=1.2, label=f"{method} (final)")
    ax.set_yscale("log")
    ax.set_xlabel("layer (forward order: q, k, v, o, gate, up, down per block)")
    ax.set_ylabel("normalised proxy loss")
    ax.set_title("proxy loss per layer")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    settings: Mapping[str, Any],
    command: str | None = None,
) -> Path:
    """Write ``report.md``, ``loss_per_layer.png`` and ``results.json`` into ``out_dir``; returns the
    report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_losses(records, out / "loss_per_layer.png")
    lines = ["# armor prune report", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["## Settings", ""]
    lines += [f"- **{k}**: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in settings.items()]
    lines += ["", "## Results", "", format_table(rows), ""]
    lines += [
        "Perplexity: documents joined with blank lines, tokenised once, non-overlapping windows, "
        "exp(mean NLL). "
        "Proxy loss: ALGORITHM.md §3 (1.0 = all weights zero), averaged over layers.",
        "",
    ]
    if png is not None:
        lines += ["## Proxy loss per layer", "", f"![proxy loss per layer]({png.name})", ""]
    for method, recs in records.items():
        if not recs:
            continue
        lines += [
            f"### {method}: per-layer losses",
            "",
            "| layer | shape | NoWag-P | final | iters | s |",
            "|---|---|---|---|---|---|",
        ]
        for r in recs:
            lines.append(
                f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['nowag_loss']:.4f} | "
                f"{r['loss']:.4f} | "
                f"{r['iterations']} | {r['seconds']:.2f} |"
            )
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": list(rows)}, indent=2, default=str))
    return report
