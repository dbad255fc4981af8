"""Static analysis of the packed n:m Triton kernel on a GPU architecture, without a GPU: what each tiling of
``armor.runtime.gpu_kernels.nm_matmul_triton`` compiles to.

    python benchmarks/gpu_sass.py --arch 90 > benchmarks/gpu_sass_sm90.md

Each tiling is compiled ahead of time (``triton.compile`` for the target, with the specialisation the JIT gives
the Llama-2-7B shapes: unit strides folded in, pointers and other sizes divisible by 16) and disassembled with the
``nvdisasm`` that triton ships.  Per tiling: registers and local (spilled) bytes per thread, the instructions of
the main loop's body, and from them **warp instructions per kept weight** (loop instructions x warps / kept
weights per step), the figure that decides whether a one-token call can be memory-bound: an H200 issues about
1.0e12 warp instructions per second (132 SMs x 4 schedulers x 1.98 GHz) and streams about 2.1e12 kept fp16
weights per second (4.8 TB/s over 2.25 bytes each), so the kernel needs fewer than about 0.5.  Also listed: the
programs of a 4096-row layer and the warps one SM can hold at the tiling's register count, which set how much
latency there is to hide behind.  These are compiler facts, not timings: ``benchmarks/gpu_tune.py`` times the
same tilings on a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from armor.runtime import gpu_kernels as gk
from armor.runtime.gpu_kernels import NMTile

#: the tilings compared by default: each form at the sizes the tile sweep starts from
TILES = [
    NMTile(16, 512, 2, 2, "join"),
    NMTile(16, 256, 4, 3, "join"),
    NMTile(16, 128, 4, 3, "xselect"),
    NMTile(16, 256, 4, 3, "xselect"),
    NMTile(16, 128, 4, 3, "xgather"),
    NMTile(16, 256, 4, 3, "xgather"),
    NMTile(32, 256, 8, 3, "xgather"),
    NMTile(16, 256, 8, 3, "xgather", split=4),
]
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
REGISTERS_PER_SM, MAX_WARPS_PER_SM = 65536, 64


def _launch_args(tokens: int, out_f: int, in_f: int, split: int, dtype: str) -> dict[str, Any]:
    """The runtime arguments of one call on a contiguous layer, by kernel parameter name: pointer types as
    strings, integers as values (what the JIT specialises on)."""
    kept = in_f // 2
    return {"x_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "idx_ptr": "*u8", "bias_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}" if split == 1 else "*fp32", "n_tok": tokens, "out_features": out_f,
            "in_features": in_f, "kept": kept, "sxt": in_f, "sxk": 1, "svo": kept, "svk": 1, "sio": in_f // 8,
            "sik": 1, "sos": tokens * out_f, "sot": out_f, "soo": 1}  # fmt: skip


def compile_tile(tile: NMTile, arch: int, tokens: int = 1, shape: tuple[int, int] = (4096, 4096),
                 dtype: str = "fp16") -> bytes:  # fmt: skip
    """The cubin of the 2:4 kernel for ``tile`` on ``sm_<arch>``, specialised as the JIT would for ``shape``."""
    out_f, in_f = shape
    block_t = 1 if tokens == 1 else max(16, triton.next_power_of_2(tokens))
    constexprs: dict[str, Any] = gk.nm_kernel_constants(tile, 2, 4, block_t, out_f, in_f)
    constexprs.update(HAS_BIAS=False, NATIVE=dtype != "fp32")
    runtime = _launch_args(tokens, out_f, in_f, tile.split, dtype)
    signature, attrs = {}, {}
    for i, name in enumerate(gk._nm_matmul_kernel.arg_names):
        value = constexprs.get(name, runtime.get(name))
        if name in constexprs or value == 1:  # the JIT folds integer arguments equal to 1 into constants
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        signature[name] = value if isinstance(value, str) else "i32"
        if isinstance(value, str) or value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=gk._nm_matmul_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": tile.warps, "num_stages": tile.stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run([os.path.join(NVIDIA_BIN, name), *flags, fh.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def loop_body(sass: str) -> list[str]:
    """The instructions of the longest loop in ``nvdisasm -c`` output: from a label to the last branch back to
    it (predicates and modifiers kept)."""
    labels, code, pending = {}, [], []
    for line in sass.splitlines():
        if m := re.match(r"^(\.L_x_\d+):", line):
            pending.append(m.group(1))
        elif m := re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line):
            address = int(m.group(1), 16)
            labels.update({name: address for name in pending})
            pending = []
            code.append((address, m.group(2)))
    best = (0, -1)
    for address, ins in code:
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), address) < address and address - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], address)
    return [ins for address, ins in code if best[0] <= address <= best[1]]


def analyse(tile: NMTile, cubin: bytes, out_f: int = 4096) -> dict[str, Any]:
    """Registers, spills and the loop's instruction count and mix of one compiled tiling."""
    usage = _tool("cuobjdump", cubin, "-res-usage")
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    body = loop_body(_tool("nvdisasm", cubin, "-c"))
    mix: dict[str, int] = {}
    for ins in body:
        op = re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]
        mix[op] = mix.get(op, 0) + 1
    kept_per_step = tile.rows * (tile.columns if tile.expand.startswith("x") else tile.columns // 2)
    threads = 32 * tile.warps
    return {"tile": tile, "regs": regs, "local": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
            "loop": len(body), "per_kept": len(body) * tile.warps / kept_per_step,
            "programs": -(-out_f // tile.rows) * tile.split,
            "warps_per_sm": min(MAX_WARPS_PER_SM, REGISTERS_PER_SM // (regs * threads) * tile.warps),
            "mix": sorted(mix.items(), key=lambda kv: -kv[1])[:6]}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| tiling (rows, columns, warps, stages, form, split) | registers | local bytes | loop instructions "
             "| warp instr. per kept weight | programs (4096 rows) | warps / SM | loop mix |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        mix = ", ".join(f"{op} {n}" for op, n in r["mix"])
        lines.append(f"| {tuple(r['tile'])} | {r['regs']} | {r['local']} | {r['loop']} | {r['per_kept']:.3f} | "
                     f"{r['programs']} | {r['warps_per_sm']} | {mix} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("this compiles for a GPU target: run it without TRITON_INTERPRET=1")
    rows = [analyse(tile, compile_tile(tile, args.arch, dtype=args.dtype)) for tile in TILES]
    command = " ".join(["python benchmarks/gpu_sass.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# Packed 2:4 kernel compiled for sm_{args.arch}, {args.dtype}, one token, 4096x4096\n")
    print(f"`{command}` (triton {triton.__version__})\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
