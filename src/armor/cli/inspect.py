"""``armor inspect``: what a pruned folder holds and how it was made."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..report import folder_footprint
from ..storage import read_armor_config
from ..storage.verify import verify_pruned_folder
from .common import CliError, HelpFormatter, not_a_model_folder

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a pruned model folder", formatter_class=HelpFormatter)
    p.add_argument("model", help="a folder written by armor prune")
    p.add_argument("--layers", action="store_true", help="per-layer losses and block sizes")
    p.add_argument("--json", action="store_true", help="print the raw armor section")
    p.add_argument(
        "--check-data", action="store_true",
        help="also read every stored tensor: packed positions valid (as the loaders check), values finite and the "
        "weights' SHA-256 as recorded (reads the whole folder; without it only the file headers are read)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise not_a_model_folder(path, args.model)
    if read_armor_config(path) is None:
        raise CliError(
            f"{args.model} is not an armor-pruned model "
            "(its config.json has no quantization_config with quant_method 'armor')"
        )
    # it checks what it describes: config, weights and records agree (and, asked, every tensor's data)
    section = verify_pruned_folder(path, data=args.check_data)
    if args.json:
        print(json.dumps(section, indent=2))
        return 0
    recs = section.get("records", [])
    layers = section.get("layers", {})
    kinds: dict[str, int] = {}
    for spec in layers.values():
        kinds[spec.get("type", "?")] = kinds.get(spec.get("type", "?"), 0) + 1
    fp = folder_footprint(path)
    blocks = sorted({(r.get("block_size_out"), r.get("block_size_in")) for r in recs if r.get("block_size_out")})
    print(f"model folder:  {path}")
    print(f"base model:    {section.get('base_model', '?')}")
    print(f"method:        {section.get('method')}  pattern {section.get('pattern')}  options {section.get('options')}")
    print(f"calibration:   {section.get('calibration')}")
    print(f"pruned layers: {len(layers)} ({', '.join(f'{v} {k}' for k, v in kinds.items())})")
    if blocks:
        print(f"block sizes:   {', '.join(f'{o}x{i}' for o, i in blocks)} (out x in)")
    print(
        f"footprint:     linear layers {fp['linear_bytes'] / 2**20:.1f} MiB = {100 * fp['linear_bytes_ratio']:.1f}% of "
        f"dense; values kept {100 * fp['values_kept_ratio']:.1f}% (wrappers {100 * fp['wrapper_overhead']:.1f}%); "
        f"weights files {fp['checkpoint_bytes'] / 2**20:.1f} MiB"
    )
    if recs:
        k = len(recs)
        print(
            f"mean loss:     NoWag-P {sum(r['nowag_loss'] for r in recs) / k:.4f} -> "
            f"{sum(r['loss'] for r in recs) / k:.4f}"
        )
        if args.layers:
            print(f"\n{'layer':<45} {'shape':>11} {'blocks':>9} {'NoWag-P':>9} {'final':>9} {'iters':>6}")
            for r in recs:
                shape = f"{r['shape'][0]}x{r['shape'][1]}"
                blk = f"{r.get('block_size_out')}x{r.get('block_size_in')}" if r.get("block_size_out") else "-"
                print(f"{r['name']:<45} {shape:>11} {blk:>9} {r['nowag_loss']:>9.4f} {r['loss']:>9.4f} "
                      f"{r['iterations']:>6}")
    if args.check_data:
        sha = ", SHA-256 as recorded" if section["checked_digests"] else " (no SHA-256 recorded)"
        print(f"data check:    {section['checked_bytes'] / 2**20:.1f} MiB read: packed positions valid, values finite"
              f"{sha}")
    print(f"versions:      {section.get('versions')}")
    return 0
