"""Layer benchmark of the armor runtime: dense vs plain 2:4 vs ARMOR, plus the 7B storage report.

    python benchmarks/bench_runtime.py --quick                      # CPU-friendly (a few minutes on 2 cores)
    python benchmarks/bench_runtime.py --device cuda --dtype float16  # full shape list on a GPU

Same options as ``armor bench`` (see :func:`armor.runtime.bench.add_bench_arguments`).
"""

from __future__ import annotations

import argparse
import sys

from armor.runtime.bench import add_bench_arguments, bench_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_arguments(parser)
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
