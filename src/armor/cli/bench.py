"""``armor bench`` (interim version; helper-1 replaces it)."""

from __future__ import annotations

import argparse

from ..runtime.bench import add_bench_arguments, bench_main

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="runtime benchmarks of pruned layers/models")
    add_bench_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return bench_main(args)
