"""``armor bench``: runtime benchmarks of pruned layers (dense vs plain 2:4 vs ARMOR on each backend) and of
whole models (greedy decode tokens/s and peak memory of pruned folders vs the dense original).

The measuring is :mod:`armor.bench`; this module parses options, loads models and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ..bench import layers as bench_layers
from ..bench.layers import DEFAULT_BATCHES, SHAPE_SETS, crossover, default_backends, run_layer_bench, storage_report
from ..bench.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from ..bench.models import model_resident_bytes, time_generation, time_prefill
from ..models import position_limit
from ..runtime import numba_available
from ..runtime.modules import BACKEND_CHOICES
from ..storage import is_pruned_folder, load_model
from ..storage.reader import read_config_json
from .bench_tables import format_crossover_table, format_layer_table, format_model_table, format_storage_table
from .common import CliError, HelpFormatter, check_device, check_writable_file, command_line, not_a_model_folder

__all__ = ["register", "run", "parse_shapes", "parse_ints"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """A preset name of :data:`armor.bench.layers.SHAPE_SETS` or a comma list of ``OUTxIN``."""
    if text in SHAPE_SETS:
        return list(SHAPE_SETS[text])
    shapes = []
    for part in text.split(","):
        try:
            o, i = part.lower().split("x")
            shapes.append((int(o), int(i)))
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"bad shape {part!r}: use OUTxIN (e.g. 11008x4096) or one of {', '.join(SHAPE_SETS)}"
            ) from err
        if shapes[-1][0] < 1 or shapes[-1][1] < 1 or shapes[-1][1] % 4:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: OUT and IN must be positive and IN a multiple of 4 "
                                             "(the layers are pruned 2:4 along IN)")
    return shapes


def _check_block_size(block: int, shapes: list[tuple[int, int]]) -> None:
    """The ARMOR wrapper blocks (``min(block, side)`` on each side) tile every shape timed or counted."""
    bad = [f"{o}x{i}" for o, i in dict.fromkeys(shapes) if o % min(block, o) or i % min(block, i)]
    if bad:
        raise CliError(f"--block-size {block} does not tile the shapes {', '.join(bad)}: each side must be a multiple "
                       "of the block size, or at most it")


def parse_ints(text: str) -> list[int]:
    """A comma list of positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parse_dtypes(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in _DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype {bad or text!r}; choose from {', '.join(_DTYPES)}")
    return names


def _parse_backends(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in BACKEND_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {bad or text!r}; choose from {', '.join(BACKEND_CHOICES)}")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="runtime benchmarks of pruned layers / models",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help=f"preset ({', '.join(SHAPE_SETS)}) or OUTxIN list, e.g. 4096x4096,11008x4096 "
        "(default: 'default' = Llama-2-7B + Qwen2.5-14B shapes; 'quick' with --quick)",
    )
    p.add_argument("--batches", type=parse_ints, default=None, help="token batches, comma list (default 1,16,128,2048)")
    p.add_argument(
        "--dtype",
        type=_parse_dtypes,
        default=None,
        help="one dtype or a comma list timed in the same run, e.g. float32,bfloat16 "
        "(default: float16 on CUDA, float32 on CPU; with --models, each folder as stored)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument(
        "--backends",
        type=_parse_backends,
        default=None,
        help=f"pruned-layer backends to time, comma list of {', '.join(BACKEND_CHOICES)} "
        "(default: the backends auto may take on the device, then dense: packed,dense on CPU; triton,dense on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per point (default 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 CUDA, 2 CPU)")
    p.add_argument("--block-size", type=int, default=128, help="ARMOR wrapper block size")
    p.add_argument(
        "--kernel-time",
        action="store_true",
        help="CUDA: report each layer call's GPU kernel time (profiler) instead of its wall time, i.e. without "
        "the per-call host work, as a CUDA-graph serving engine would run it",
    )
    p.add_argument(
        "--graph-time",
        action="store_true",
        help="CUDA: report the time of one replay of each layer call captured in a CUDA graph",
    )
    p.add_argument(
        "--quick", action="store_true", help="small CPU-friendly run: shapes 'quick', batches 1,16,128, 3 repeats"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="DIR",
        help="model level instead: prefill and greedy decode tokens/s, resident weights and peak RSS of each "
        "folder (dense HF or pruned by armor), each measured in a fresh process",
    )
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for --models")
    p.add_argument("--new-tokens", type=int, default=32, help="greedily generated tokens for --models")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=_COMPILE_MODES,
        metavar="MODE",
        help="--models: torch.compile each model's forward (mode: default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs; no value: default) and generate with a static KV cache; compile time is "
        "in the untimed warm-up",
    )
    p.add_argument("--no-storage", action="store_true", help="skip the 7B storage report")
    p.add_argument("--storage-only", action="store_true", help="only the 7B storage report")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all records as JSON here")
    p.set_defaults(func=run)


def _load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def _where(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class _ModelRun:
    """What every model of ``armor bench --models`` is measured with (sent to each model's process)."""

    dtype_name: str | None
    device: str
    prompt: int
    new: int
    repeats: int
    threads: int | None
    compile_mode: str | None


def _compiled(model: torch.nn.Module, mode: str) -> None:
    """Compile ``model``'s forward in place and make ``generate`` use a static KV cache (fixed shapes: one graph
    for the prompt, one for the decode step), without its own automatic compile on top."""
    model.forward = torch.compile(model.forward, mode=None if mode == "default" else mode)
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True


def _measure_model(folder: str, run: _ModelRun) -> dict[str, Any]:
    """One model folder, in its own process: load, prefill and greedy decode timing, resident and peak bytes."""
    if run.threads:
        torch.set_num_threads(run.threads)
    reset_peak_rss()
    base = rss_bytes()
    dtype = _DTYPES[run.dtype_name] if run.dtype_name else None
    model = load_model(folder, dtype=dtype, device=run.device)
    if run.compile_mode:
        _compiled(model, run.compile_mode)
    ids = torch.randint(0, model.config.vocab_size, (1, run.prompt), generator=torch.Generator().manual_seed(0))
    pre = time_prefill(model, ids, repeats=run.repeats, warmup=1)
    gen = time_generation(model, ids, run.new, repeats=run.repeats, warmup=1)
    backends = sorted({m.active_backend for m in model.modules() if hasattr(m, "active_backend")})
    return {
        "name": folder,
        "kind": ("pruned" if is_pruned_folder(folder) else "dense") + (f" ({', '.join(backends)})" if backends else ""),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "compile": run.compile_mode,
        "prefill_tokens_per_s": pre["tokens_per_s"],
        **{k: gen[k] for k in ("tokens_per_s", "decode_tokens_per_s", "new_tokens", "prefill_seconds")},
        "resident_bytes": model_resident_bytes(model),
        "peak_rss_bytes": peak_rss_bytes(),
        "base_rss_bytes": base,
    }


def _run_models(args: argparse.Namespace, device: torch.device, repeats: int) -> tuple[str, list[dict[str, Any]]]:
    for folder in args.models:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise not_a_model_folder(Path(folder), folder)
        limit = position_limit(read_config_json(Path(folder)) or {})
        if limit is not None and args.prompt_tokens + args.new_tokens > limit:
            raise CliError(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} is longer than "
                           f"the max_position_embeddings ({limit}) of {folder}")
    rows = []
    for dtype_name in args.dtype or [None]:  # None: each folder in its stored dtype
        run = _ModelRun(dtype_name=dtype_name, device=str(device), prompt=args.prompt_tokens,
                        new=args.new_tokens, repeats=repeats, threads=args.threads, compile_mode=args.compile)
        for folder in args.models:
            # a fresh process per model: its peak RSS is its own, not the high-water mark of the previous model
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                rows.append(pool.submit(_measure_model, folder, run).result())
    compiled = f"torch.compile (mode {args.compile}) with a static KV cache" if args.compile else "eager"
    text = (
        f"model level: prompt {args.prompt_tokens} random tokens (batch 1), {args.new_tokens} greedy new tokens, "
        f"{compiled}, median of {repeats}; each model in a fresh process\n\n{format_model_table(rows)}\n\n"
        "decode tokens/s = (new tokens - 1) / (generate time - one prefill); resident weights = distinct "
        "parameter/buffer bytes + runtime caches; peak RSS = the process's high-water mark over load + runs "
        "(above start: minus the RSS before loading, i.e. after importing torch)"
    )
    return text, rows


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe and print a Markdown report; 0 on success."""
    device_text = check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_text)
    on_cuda = device.type == "cuda"
    for name in ("repeats", "warmup", "threads", "block_size", "prompt_tokens", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise CliError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_names = args.dtype or (["float16"] if on_cuda else ["float32"])
    shapes = args.shapes or (SHAPE_SETS["quick"] if args.quick else SHAPE_SETS["default"])
    batches = args.batches or ([1, 16, 128] if args.quick else list(DEFAULT_BATCHES))
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else (20 if on_cuda else 5))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (3 if on_cuda else 2))
    backends = args.backends or list(default_backends(device))
    check_writable_file("--json", args.json)
    if args.compile and not args.models:
        raise CliError("--compile applies to --models (the layer tables time each backend's kernels directly)")
    if not args.models:
        _check_block_size(args.block_size, [*([] if args.storage_only else shapes),
                                            *([] if args.no_storage else bench_layers.LLAMA7B_STACK)])

    print(f"# armor runtime bench\n\n`{command_line()}`\n")
    print(
        f"torch {torch.__version__}, numba {'yes' if numba_available() else 'not installed'}, device {device} "
        f"({_where(device)}), load average at start {_load_average()}\n"
    )
    out: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "device_name": _where(device)}
    if args.models:
        text, rows = _run_models(args, device, repeats)
        print(text)
        out["models"] = rows
    else:
        if not args.storage_only:
            print(
                f"shapes {shapes}, batches {batches}, dtypes {dtype_names}, backends {backends}, repeats {repeats}, "
                f"warm-up {warmup}, ARMOR blocks {args.block_size}\n"
            )
            records: list[dict[str, Any]] = []
            for name in dtype_names:
                records += run_layer_bench(
                    shapes,
                    batches,
                    _DTYPES[name],
                    device,
                    repeats,
                    warmup,
                    args.block_size,
                    backends=backends,
                    timing="kernels" if args.kernel_time else "graph" if args.graph_time else "wall",
                )
            print(format_layer_table(records))
            print(
                "\nspeed-up = dense median / this median (> 1 is faster), (min) = the same from the fastest rounds; "
                "stored = packed state_dict bytes; resident = what the module keeps between calls (state + "
                "runtime cache); layers of one (shape, batch) are timed in interleaved rounds\n"
            )
            print(format_crossover_table(crossover(records)))
            out["layers"] = records
        if not args.no_storage:
            rep = storage_report(block_size=args.block_size, dtype=_DTYPES[dtype_names[0]])
            print("\n" + format_storage_table(rep))
            out["storage"] = rep
    print(f"\nload average at end {_load_average()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    return 0
