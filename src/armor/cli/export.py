"""``armor export``: a plain dense Hugging Face folder of a pruned model, for tools that know nothing of ARMOR."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..storage import export_dense, read_armor_config
from .common import CliError, HelpFormatter

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a plain dense HF folder of a pruned model", formatter_class=HelpFormatter)
    p.add_argument("model", help="a folder written by armor prune")
    p.add_argument("output", help="the new folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise CliError(f"not a model folder (no config.json): {args.model}")
    if read_armor_config(path) is None:
        raise CliError(
            f"{args.model} is not an armor-pruned model "
            "(its config.json has no quantization_config with quant_method 'armor')"
        )
    out = Path(args.output)
    if out.resolve() == Path(path).resolve():
        raise CliError(f"{out} is the pruned model being exported: the dense copy would replace it; choose another "
                       "folder")
    if out.exists() and not out.is_dir():
        raise CliError(f"{out} is a file, not a folder; choose a folder for the dense model")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CliError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    export_dense(path, out)
    print(f"dense Hugging Face model written to {out}")
    return 0
