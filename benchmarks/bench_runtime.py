"""Layer benchmark of the armor runtime: the same as ``armor bench`` (see :mod:`armor.cli.bench`).

    python benchmarks/bench_runtime.py --quick                            # CPU-friendly
    python benchmarks/bench_runtime.py --shapes llama7b --batches 1 --dtype float32,bfloat16
    python benchmarks/bench_runtime.py --device cuda --dtype float16,bfloat16  # on a GPU
"""

from __future__ import annotations

import sys

from armor.cli import main

if __name__ == "__main__":
    sys.argv = ["armor", "bench", *sys.argv[1:]]  # so that the report shows the equivalent armor command
    sys.exit(main(sys.argv[1:]))
