"""One packed layer's CPU kernel on one thread vs on numba's pool, per shape and token count: the table behind
``armor.runtime.kernels.CPU_PARALLEL_MIN_WORK`` (a call goes to the pool only when its kept values x passes over
them reach it).

    python benchmarks/cpu_threads.py --threads 2 > table.md

Each point is the median of ``--repeats`` calls of ``nm_matmul`` (plain 2:4) and ``armor_matmul`` (ARMOR with
blocks of the given size), float32, the same inputs for both thread counts; the parallel kernels are called
directly, whatever the threshold says.
"""

from __future__ import annotations

import argparse
import sys

import torch

from armor.bench.layers import median_seconds, random_nm_result
from armor.runtime import kernels
from armor.runtime.packing import pack_nm

#: (out, in, wrapper block): SmolLM2-135M's shapes, then larger ones up to Llama-2-7B's
SHAPES = [(576, 576, 16), (1536, 576, 32), (576, 1536, 32), (2048, 2048, 64), (4096, 4096, 128),
          (11008, 4096, 128)]  # fmt: skip


def _median_us(fn, repeats: int) -> float:
    return median_seconds(fn, torch.device("cpu"), repeats, warmup=3) * 1e6


def _point(out_f: int, in_f: int, block: int, tokens: int, threads: int, repeats: int) -> list[str]:
    res = random_nm_result(out_f, in_f, block)
    values, idx = pack_nm(res.core * res.mask, res.mask)
    x = torch.randn(tokens, in_f)
    args = {"SPARSE": (values.numpy(), idx.numpy(), x.numpy(), 2, 4, 2),
            "ARMOR": (res.b_blocks.contiguous().numpy(), values.numpy(), idx.numpy(),
                      res.a_blocks.contiguous().numpy(), x.numpy(), 2, 4, 2)}  # fmt: skip
    cells = []
    for name in ("SPARSE", "ARMOR"):
        serial, parallel = getattr(kernels, name)
        one = _median_us(lambda: serial(*args[name]), repeats)  # noqa: B023 - called before the loop moves on
        kernels.numba.set_num_threads(threads)
        many = _median_us(lambda: parallel(*args[name]), repeats)  # noqa: B023
        cells += [f"{one:.0f}", f"{many:.0f}", f"{one / many:.2f}x"]
    work = kernels._work(values, tokens)
    return [f"{out_f}x{in_f}", str(tokens), f"{work / 2**20:.1f}M", *cells,
            "pool" if work >= kernels.CPU_PARALLEL_MIN_WORK else "one thread"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="numba threads of the parallel kernels")
    p.add_argument("--tokens", default="1,4,16,32", help="token counts, comma list")
    p.add_argument("--repeats", type=int, default=51)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    kernels._first_launch()  # the threading layer armor picks, before the pool starts
    command = " ".join(["python benchmarks/cpu_threads.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"`{command}`\n")
    print("| shape | tokens | work (kept x passes) | 2:4 one thread us | 2:4 pool us | pool speed-up | "
          "ARMOR one thread us | ARMOR pool us | pool speed-up | armor runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for out_f, in_f, block in SHAPES:
        for tokens in map(int, args.tokens.split(",")):
            print("| " + " | ".join(_point(out_f, in_f, block, tokens, args.threads, args.repeats)) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
