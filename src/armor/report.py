"""The footprint of a pruned model and the Markdown report / loss plot of an ``armor prune`` run.

Every quality figure armor prints comes with its footprint: the stored bytes of the pruned linear layers and of the
whole checkpoint relative to dense, the values kept, and the wrapper overhead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import find_decoder_layers, unfuse_experts
from .runtime.packing import packed_index_shape
from .storage import read_armor_config
from .storage.atomic import write_text_atomic
from .storage.checkpoint import meta_skeleton, open_safetensors, weight_files

__all__ = [
    "layer_footprint",
    "folder_footprint",
    "DENSE_FOOTPRINT",
    "result_row",
    "format_table",
    "write_report",
    "plot_losses",
    "reconstruction_lines",
    "reconstruction_summary",
]

#: The footprint columns of the dense model itself.
DENSE_FOOTPRINT = {
    "linear_bytes_ratio": 1.0, "checkpoint_bytes_ratio": 1.0, "values_kept_ratio": 1.0, "wrapper_overhead": 0.0,
}


def _elem(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def layer_footprint(spec: Mapping[str, Any], dtype: str) -> dict[str, int]:
    """Stored values and bytes of one packed layer (from its spec) and of the dense layer it replaces."""
    out_f, in_f, n, m = int(spec["out_features"]), int(spec["in_features"]), int(spec["n"]), int(spec["m"])
    elem = _elem(dtype)
    kept = out_f * in_f // m * n
    rows, cols = packed_index_shape(out_f, in_f, n, m)
    wrappers = 0
    if spec.get("type") == "armor":
        wrappers = out_f * int(spec["block_size_out"]) + in_f * int(spec["block_size_in"])
    bias = out_f if spec.get("bias") else 0
    return {
        "kept": kept,
        "wrappers": wrappers,
        "dense": out_f * in_f,
        "bytes": (kept + wrappers + bias) * elem + rows * cols,
        "dense_bytes": (out_f * in_f + bias) * elem,
    }


def _dense_left_footprint(folder: Path, section: Mapping[str, Any]) -> dict[str, int]:
    """Values and bytes of the decoder blocks' linear layers that the pruned folder stores dense (left out by
    ``--layers``/``--exclude``, an odd width, a router), so that the ratios are of all the blocks' linear layers,
    as the dense model stores them; nothing for a folder without a readable config or weights header."""
    specs = section.get("layers", {})
    try:
        model = meta_skeleton(folder, strip_quantization=True)
        unfuse_experts(model, section.get("unfused_experts") or [], check=False)
        prefix, blocks = find_decoder_layers(model)
        files = weight_files(folder, section.get("weights", "model.safetensors"))
    except (OSError, ValueError):
        return {}
    left = {f"{prefix}.{i}.{sub}": mod for i, block in enumerate(blocks) for sub, mod in block.named_modules()
            if isinstance(mod, nn.Linear) and f"{prefix}.{i}.{sub}" not in specs}
    sizes: dict[str, int] = {}
    for f in files:
        with open_safetensors(f) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no iteration
                if key.removesuffix(".weight").removesuffix(".bias") in left:
                    part = handle.get_slice(key)  # [:0] reads no data: an empty tensor of the stored dtype
                    sizes[key] = int(torch.Size(part.get_shape()).numel()) * part[:0].element_size()
    values = sum(mod.weight.numel() for mod in left.values())
    stored = sum(sizes.values())
    return {"dense": values, "kept": values, "bytes": stored, "dense_bytes": stored}


def _weights_bytes(folder: Path) -> int:
    """Bytes of the weight files ``from_pretrained`` reads from ``folder``: ``model.safetensors`` or the shards
    its index lists, else the pickled ``pytorch_model.bin`` (or its shards).  Other files in the folder (a
    ``consolidated.safetensors`` beside the shards, shards an earlier save left) are not counted; 0 when it has
    none of them."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            files = weight_files(folder, name)
        except FileNotFoundError:
            continue
        return sum(p.stat().st_size for p in files)
    return 0  # no weights in a format from_pretrained reads: no ratio is reported


def folder_footprint(folder: str | Path, dense_folder: str | Path | None = None) -> dict[str, Any]:
    """Footprint of a pruned folder: linear-layer bytes and values vs dense, wrapper overhead, and (given the
    dense checkpoint) the whole checkpoint's bytes vs dense (same dtype assumed as stored)."""
    folder = Path(folder)
    section = read_armor_config(folder) or {}
    specs, dtypes = section.get("layers", {}), section.get("layer_dtypes", {})
    tot = {"kept": 0, "wrappers": 0, "dense": 0, "bytes": 0, "dense_bytes": 0}
    for name, spec in specs.items():
        for k, v in layer_footprint(spec, dtypes.get(name, "float32")).items():
            tot[k] += v
    for k, v in _dense_left_footprint(folder, section).items():  # linears a selection or their width kept dense
        tot[k] += v
    dense = max(tot["dense"], 1)
    out = {
        "layers": len(specs),
        "linear_bytes_ratio": tot["bytes"] / max(tot["dense_bytes"], 1),
        "values_kept_ratio": (tot["kept"] + tot["wrappers"]) / dense,
        "wrapper_overhead": tot["wrappers"] / dense,
        "linear_bytes": tot["bytes"],
        "dense_linear_bytes": tot["dense_bytes"],
        "checkpoint_bytes": _weights_bytes(folder),
    }
    if dense_folder is not None:
        dense_bytes = _weights_bytes(Path(dense_folder))
        # no weight file found (another format): no ratio rather than one against zero
        out["checkpoint_bytes_ratio"] = out["checkpoint_bytes"] / dense_bytes if dense_bytes else None
    return out


def result_row(method: str, evaluation: Mapping[str, Any], **measures: Any) -> dict[str, Any]:
    """One row of the results table: the method, its perplexity and task accuracies (``task/acc``,
    ``task/acc_norm`` columns) from an evaluation, the whole evaluation, then ``measures`` (footprint, losses,
    times)."""
    ppl = evaluation.get("perplexity", {}).get("ppl")
    tasks = {f"{task}/{metric}": value for task, metrics in evaluation.get("tasks", {}).items()
             for metric, value in metrics.items() if metric in ("acc", "acc_norm")}
    return {"method": method, "ppl": ppl, **tasks, "evaluation": dict(evaluation), **measures}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: perplexity next to the footprint, the proxy losses and the pruning time."""
    tasks = list(dict.fromkeys(k for r in rows for k in r if "/" in k))  # "task/acc" columns from lm-eval
    head = (
        "| method | ppl | " + "".join(f"{t} | " for t in tasks) + "linear bytes / dense | checkpoint / dense | "
        "values kept | wrapper overhead | mean NoWag-P loss | mean final loss | prune s |\n"
        + "|---" * (9 + len(tasks)) + "|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r.get('ppl'))} | " + "".join(f"{_fmt(r.get(t), 3)} | " for t in tasks)
            + f"{_pct(r.get('linear_bytes_ratio'))} | "
            f"{_pct(r.get('checkpoint_bytes_ratio'))} | {_pct(r.get('values_kept_ratio'))} | "
            f"{_pct(r.get('wrapper_overhead'))} | {_fmt(r.get('mean_nowag_loss'), 4)} | "
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


def _projection(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def reconstruction_summary(recon: Mapping[str, Any]) -> str:
    """One line: blocks kept, mean held-out output error before and after (the training error when nothing is
    held out), seconds spent."""
    blocks = recon.get("blocks", [])
    k = max(len(blocks), 1)
    before = sum(b["error_before"] for b in blocks) / k
    after = sum(b["error_after"] if b["kept"] else b["error_before"] for b in blocks) / k
    seconds = sum(b.get("seconds", 0.0) for b in blocks)
    judged = "held-out" if recon.get("holdout", 1) else "training (nothing held out)"
    return (f"reconstruction: {sum(b['kept'] for b in blocks)}/{len(blocks)} blocks improved, mean {judged} output "
            f"error {before:.4f} -> {after:.4f}, {seconds:.0f} s")


def reconstruction_lines(method: str, recon: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown: each block's held-out output error before and after reconstruction, and each projection type's
    proxy loss before and after (where the gain comes from)."""
    lines = [f"### {method}: block-wise reconstruction", "",
             f"Settings: {json.dumps({k: v for k, v in recon.items() if k != 'blocks'})}. Output error: "
             "sum |y - y_dense|^2 / sum |y_dense|^2 of the block's output on the "
             + ("held-out calibration sequences." if recon.get("holdout", 1) else
                "training sequences (none is held out here)."),
             "", "| block | output error before | after | kept |", "|---|---|---|---|"]
    for b in recon.get("blocks", []):
        lines.append(f"| {b['block']} | {b['error_before']:.5f} | {_fmt(b['error_after'], 5)} | "
                     f"{'yes' if b['kept'] else 'no (pruned tensors kept)'} |")
    by_type: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in records:
        info = r.get("reconstruction") or {}
        if "loss_after" in info and "output_error" in info:
            row = (*info["output_error"], r["loss"], info["loss_after"])
            by_type.setdefault(_projection(r["name"]), []).append(row)
    if by_type:
        lines += ["", "Per projection type (means over blocks): the layer's relative output error against its dense "
                  "weight on the pruned model's held-out inputs, and its proxy loss (§3).", "",
                  "| projection | output error, pruned | after reconstruction | proxy loss, pruned | after | layers |",
                  "|---|---|---|---|---|---|"]
        for proj, rows in by_type.items():
            means = [sum(row[c] for row in rows) / len(rows) for c in range(4)]
            lines.append(f"| {proj} | " + " | ".join(f"{v:.4f}" for v in means) + f" | {len(rows)} |")
    return lines + [""]


def write_report(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    settings: Mapping[str, Any],
    command: str | None = None,
) -> Path:
    """Write ``report.md``, ``loss_per_layer.png`` and ``results.json`` into ``out_dir``; returns the report."""
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
        "Perplexity: the protocol in the settings above (recorded per row in results.json). Linear bytes: the "
        "decoder blocks' linear layers as stored (pruned ones: values, 2-bit positions, wrappers, bias; any left "
        "dense: as they are) over the same layers dense in the same dtype; checkpoint: the weights files. Values "
        "kept: kept core entries, wrapper entries and the entries of layers left dense, over the dense entries of "
        "those layers. "
        "Proxy loss: docs/algorithm.md §3 (1.0 = all weights zero), averaged over layers.",
        "",
    ]
    if png is not None:
        lines += ["## Proxy loss per layer", "", f"![proxy loss per layer]({png.name})", ""]
    for row in rows:
        if row.get("reconstruction"):
            lines += reconstruction_lines(row["method"], row["reconstruction"], records.get(row["method"], []))
    for method, recs in records.items():
        if not recs:
            continue
        lines += [
            f"### {method}: per-layer losses",
            "",
            "| layer | shape | blocks (out, in) | NoWag-P | final | iters | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            blocks = f"{r.get('block_size_out')}, {r.get('block_size_in')}" if r.get("block_size_out") else "–"
            lines.append(
                f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {blocks} | {r['nowag_loss']:.4f} | "
                f"{r['loss']:.4f} | {r['iterations']} | {r['seconds']:.2f} |"
            )
        lines.append("")
    report = out / "report.md"
    write_text_atomic("\n".join(lines), report)
    results = json.dumps({"settings": settings, "results": list(rows)}, indent=2, default=str)
    write_text_atomic(results, out / "results.json")
    return report
