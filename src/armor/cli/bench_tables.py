"""Markdown tables of ``armor bench``: the layer records, crossovers, storage and model rows of :mod:`armor.bench`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_layer_table", "format_crossover_table", "format_storage_table", "format_model_table", "fmt_bytes"]


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_layer_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_layer_bench` records."""
    head = (
        "| dtype | shape (out x in) | batch | method | backend (ran) | median ms | speed-up vs dense | min ms | "
        "speed-up (min) | stored | resident | resident / dense |\n"
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in records:
        ran = r["backend"] if r["active_backend"] == r["backend"] else f"{r['backend']} ({r['active_backend']})"
        lines.append(
            f"| {r['dtype']} | {r['shape']} | {r['batch']} | {r['method']} | {ran} | {r['median_s'] * 1e3:.3f} | "
            f"{r['speedup_vs_dense']:.2f}x | {r['min_s'] * 1e3:.3f} | {r['min_speedup_vs_dense']:.2f}x | "
            f"{fmt_bytes(r['stored_bytes'])} | {fmt_bytes(r['resident_bytes'])} | {r['resident_vs_dense']:.4f} |"
        )
    return "\n".join(lines)


def format_crossover_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`crossover` rows."""
    lines = [
        "| dtype | shape (out x in) | method | backend | speed-up vs dense by batch | dense wins from batch |",
        "|---|---|---|---|---|---:|",
    ]
    for r in rows:
        ups = ", ".join(f"{b}: {x:.2f}x" for b, x in r["speedups"].items())
        lose = f"> {max(r['speedups'])}" if r["dense_wins_from"] is None else str(r["dense_wins_from"])
        lines.append(f"| {r['dtype']} | {r['shape']} | {r['method']} | {r['backend']} | {ups} | {lose} |")
    return "\n".join(lines)


def format_storage_table(rep: dict[str, Any]) -> str:
    """Markdown table of a :func:`storage_report`."""
    lines = [
        f"Storage ({rep['dtype']}, ARMOR blocks {rep['block_size']}):",
        "",
        "| shape (out x in) | count | dense | plain 2:4 | ARMOR | ARMOR / dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rep["layers"]:
        lines.append(
            f"| {r['shape']} | {r['count']} | {fmt_bytes(r['dense'])} | {fmt_bytes(r['sparse'])} | "
            f"{fmt_bytes(r['armor'])} | {r['armor'] / r['dense']:.4f} |"
        )
    t = rep["total_bytes"]
    lines.append(
        f"| **total** | | {fmt_bytes(t['dense'])} | {fmt_bytes(t['sparse'])} ({rep['sparse_ratio']:.4f}) | "
        f"{fmt_bytes(t['armor'])} | **{rep['armor_ratio']:.4f}** |"
    )
    return "\n".join(lines)


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of model-level rows: ``name``, ``kind``, ``dtype``, :func:`time_generation` fields,
    ``resident_bytes`` (:func:`model_resident_bytes`), ``peak_rss_bytes`` and ``base_rss_bytes`` (RSS before
    loading)."""
    lines = [
        "| model | kind | dtype | prefill tokens/s | decode tokens/s | resident weights | peak RSS | "
        "peak RSS above start |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        decode = r.get("decode_tokens_per_s")
        peak, base = r.get("peak_rss_bytes"), r.get("base_rss_bytes")
        above = None if peak is None or base is None else peak - base
        lines.append(
            f"| {r['name']} | {r['kind']} | {r.get('dtype', '?')} | {r['prefill_tokens_per_s']:.1f} | "
            f"{'n/a' if decode is None else f'{decode:.2f}'} | {fmt_bytes(r['resident_bytes'])} | "
            f"{fmt_bytes(peak)} | {fmt_bytes(above)} |"
        )
    return "\n".join(lines)
