"""Layer and model timing for the runtime: dense ``F.linear`` vs plain 2:4 (:class:`SparseLinear`) vs ARMOR
(:class:`ArmorLinear`), storage of the packed state, and tokens/s helpers for any Hugging Face causal LM.

The CLI owner wires ``armor bench`` with :func:`add_bench_arguments` and :func:`bench_main`; the script
``benchmarks/bench_runtime.py`` does the same stand-alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..result import PruneResult
from ..sparsity import nm_supports
from .modules import empty_module_from_spec, module_from_result, state_nbytes

__all__ = [
    "SHAPE_SETS",
    "DEFAULT_BATCHES",
    "random_nm_result",
    "run_layer_bench",
    "storage_report",
    "format_layer_table",
    "format_storage_table",
    "time_prefill",
    "time_generation",
    "add_bench_arguments",
    "bench_main",
]

#: Named shape lists, ``(out_features, in_features)``.
SHAPE_SETS: dict[str, list[tuple[int, int]]] = {
    "llama7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "qwen14b": [(13824, 5120)],
    "default": [(4096, 4096), (11008, 4096), (4096, 11008), (13824, 5120)],
    "quick": [(4096, 4096), (11008, 4096)],
    "small": [(1024, 1024), (2816, 1024)],
}
DEFAULT_BATCHES = (1, 16, 128, 2048)
#: Llama-2-7B decoder linear layers: (out, in) -> count over 32 layers.
LLAMA7B_STACK: dict[tuple[int, int], int] = {(4096, 4096): 32 * 4, (11008, 4096): 32 * 2, (4096, 11008): 32}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# random layers
def random_nm_result(
    out_features: int,
    in_features: int,
    block_size: int | None = None,
    n: int = 2,
    m: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> PruneResult:
    """A :class:`PruneResult` with random weights and a uniformly random n:m mask (timing and storage only).

    With ``block_size`` the result carries random near-identity wrapper blocks (an ARMOR layer), else none.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    supports = nm_supports(n, m)  # (C, n)
    choice = torch.randint(len(supports), (out_features, in_features // m), generator=g)
    mask = torch.zeros(out_features, in_features // m, m, dtype=torch.bool)
    mask.scatter_(-1, supports[choice], True)
    mask = mask.reshape(out_features, in_features)
    core = torch.randn(out_features, in_features, generator=g) * in_features**-0.5 * mask
    a = b = None
    if block_size is not None:
        bo, bi = min(block_size, out_features), min(block_size, in_features)
        eye_o, eye_i = torch.eye(bo), torch.eye(bi)
        a = eye_o + 0.05 * torch.randn(out_features // bo, bo, bo, generator=g)
        b = eye_i + 0.05 * torch.randn(in_features // bi, bi, bi, generator=g)
    res = PruneResult(
        "armor" if a is not None else "random",
        core.to(device),
        mask.to(device),
        float("nan"),
        float("nan"),
        n=n,
        m=m,
        a_blocks=None if a is None else a.to(device),
        b_blocks=None if b is None else b.to(device),
        block_size_out=None if a is None else a.shape[1],
        block_size_in=None if b is None else b.shape[1],
    )
    return res


# ----------------------------------------------------------------------------------------------------
# timing primitives
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _MemProbe:
    """Peak memory of a phase: CUDA ``max_memory_allocated`` above the start, or CPU RSS delta."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_rss_delta"

    def __enter__(self) -> _MemProbe:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _rss_bytes()
        self.peak: int | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            end = _rss_bytes()
            self.peak = None if end is None or self.start is None else end - self.start


def _module_resident_bytes(mod: nn.Module) -> int:
    cache = mod.cache_nbytes() if hasattr(mod, "cache_nbytes") else 0
    return state_nbytes(mod) + cache


# ----------------------------------------------------------------------------------------------------
# layer benchmark
def _build_layer(
    proto: Tensor | nn.Module, backend: str, x: Tensor, device: torch.device, warmup: int
) -> dict[str, Any]:
    """Build one layer from ``proto`` on ``device`` and run its warm-up calls, inside a memory probe."""
    with _MemProbe(device) as probe:
        if isinstance(proto, Tensor):
            w = proto.to(device=device, copy=True)

            def fn() -> Tensor:
                return F.linear(x, w)

            used, stored = "F.linear", w.numel() * w.element_size()
        else:
            layer = empty_module_from_spec(proto.spec(), dtype=x.dtype, device=device, backend=backend)
            layer.load_state_dict(proto.state_dict())

            def fn() -> Tensor:
                return layer(x)

            stored = state_nbytes(layer)
        for _ in range(max(1, warmup)):  # at least one: it builds the lazy caches
            fn()
        _sync(device)
    if not isinstance(proto, Tensor):
        used = layer.active_backend  # after the first forward: auto may have fallen back
    resident = stored if isinstance(proto, Tensor) else _module_resident_bytes(layer)
    return {
        "fn": fn,
        "backend": used,
        "stored_bytes": stored,
        "resident_bytes": resident,
        "peak_mem_bytes": probe.peak,
        "mem_method": probe.method,
    }


def run_layer_bench(
    shapes: Sequence[tuple[int, int]] = SHAPE_SETS["default"],
    batches: Sequence[int] = DEFAULT_BATCHES,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
    block_size: int = 128,
    armor_backend: str = "auto",
    sparse_backend: str = "auto",
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time ``y = layer(x)`` for ``x`` of shape ``(batch, in)``: dense ``F.linear`` vs :class:`SparseLinear`
    (2:4) vs :class:`ArmorLinear` (2:4 core, ``block_size`` wrapper blocks), random weights and mask.

    For each (shape, batch) the three layers are built and warmed up, then timed in interleaved rounds
    (one call of each per round) so that a load change on a shared machine hits all three alike.

    Returns one record per (shape, batch, method): the median seconds over ``repeats`` rounds (CUDA
    synchronised), tokens/s (= batch / median), ``speedup_vs_dense`` (dense median / method median, > 1 is
    faster), ``stored_bytes`` (packed ``state_dict`` bytes; the weight itself for dense), ``resident_bytes``
    (stored + runtime caches such as the unpacked core), ``peak_mem_bytes`` and ``mem_method``:
    ``cuda_max_memory_allocated`` (peak above the level before the build, over build + warm-up) or
    ``cpu_rss_delta`` (RSS after build + warm-up minus before; indicative only).
    """
    device = torch.device(device)
    records: list[dict[str, Any]] = []
    armor_name = f"armor-b{block_size}"
    for out_f, in_f in shapes:
        # Pack once per shape (CPU); each timed layer is then a fresh load of that state on the device, which
        # is also how a saved model comes back.
        dense_src = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * in_f**-0.5
        protos: dict[str, Any] = {
            "dense": dense_src.to(dtype),
            "sparse-2:4": module_from_result(random_nm_result(out_f, in_f, None, seed=seed), None, dtype),
            armor_name: module_from_result(
                random_nm_result(out_f, in_f, block_size, seed=seed + 1), None, dtype
            ),
        }
        backends = {"sparse-2:4": sparse_backend, armor_name: armor_backend}
        if armor_backend == "auto":
            # the factorised path with a dense core, whatever auto picks (on CPU auto folds W_hat)
            protos[armor_name + "-factorised"] = protos[armor_name]
            backends[armor_name + "-factorised"] = "dense"
        for batch in batches:
            with torch.inference_mode():
                x = torch.randn(batch, in_f).to(device=device, dtype=dtype)
                built = {
                    name: _build_layer(p, backends.get(name, ""), x, device, warmup)
                    for name, p in protos.items()
                }
                times: dict[str, list[float]] = {name: [] for name in built}
                for _ in range(max(1, repeats)):
                    for name, b in built.items():
                        _sync(device)
                        start = time.perf_counter()
                        b["fn"]()
                        _sync(device)
                        times[name].append(time.perf_counter() - start)
            dense_sec = statistics.median(times["dense"])
            for name, b in built.items():
                sec = statistics.median(times[name])
                rec = {
                    "shape": f"{out_f}x{in_f}",
                    "out_features": out_f,
                    "in_features": in_f,
                    "batch": batch,
                    "method": name,
                    "backend": b["backend"],
                    "median_s": sec,
                    "tokens_per_s": batch / sec,
                    "speedup_vs_dense": dense_sec / sec,
                    "stored_bytes": b["stored_bytes"],
                    "resident_bytes": b["resident_bytes"],
                    "peak_mem_bytes": b["peak_mem_bytes"],
                    "mem_method": b["mem_method"],
                    "dtype": str(dtype).replace("torch.", ""),
                    "device": str(device),
                    "repeats": repeats,
                    "warmup": warmup,
                }
                records.append(rec)
                if progress is not None:
                    progress(rec)
            del built, x
            gc.collect()
        del protos, dense_src
        gc.collect()
    return records


# ----------------------------------------------------------------------------------------------------
# storage
def storage_report(
    stack: dict[tuple[int, int], int] | None = None,
    block_size: int = 128,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Bytes on disk of a layer stack (default: Llama-2-7B's 32 x {q,k,v,o,gate,up,down}), dense vs plain
    2:4 vs ARMOR, each counted from the ``state_dict`` of ONE real packed layer per shape times its count."""
    stack = dict(LLAMA7B_STACK if stack is None else stack)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    totals = {"dense": 0, "sparse": 0, "armor": 0}
    for i, ((out_f, in_f), count) in enumerate(stack.items()):
        dense = out_f * in_f * elem
        sparse_mod = module_from_result(random_nm_result(out_f, in_f, None, seed=i), None, dtype)
        armor_mod = module_from_result(random_nm_result(out_f, in_f, block_size, seed=i), None, dtype)
        sizes = {"dense": dense, "sparse": state_nbytes(sparse_mod), "armor": state_nbytes(armor_mod)}
        parts = {k: v.numel() * v.element_size() for k, v in armor_mod.state_dict().items()}
        rows.append({"shape": f"{out_f}x{in_f}", "count": count, **sizes, "armor_parts": parts})
        for k in totals:
            totals[k] += sizes[k] * count
        del sparse_mod, armor_mod
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "block_size": block_size,
        "layers": rows,
        "total_bytes": totals,
        "sparse_ratio": totals["sparse"] / totals["dense"],
        "armor_ratio": totals["armor"] / totals["dense"],
    }


# ----------------------------------------------------------------------------------------------------
# tables
def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_layer_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_layer_bench` records."""
    head = (
        "| shape (out x in) | batch | method | backend | median ms | tokens/s | speed-up vs dense | stored | "
        "resident | peak mem |\n|---|---:|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in records:
        sp = r["speedup_vs_dense"]
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['method']} | {r['backend']} | {r['median_s'] * 1e3:.3f} | "
            f"{r['tokens_per_s']:.1f} | {'n/a' if sp is None else f'{sp:.2f}x'} | "
            f"{_fmt_bytes(r['stored_bytes'])} | "
            f"{_fmt_bytes(r['resident_bytes'])} | {_fmt_bytes(r['peak_mem_bytes'])} |"
        )
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
            f"| {r['shape']} | {r['count']} | {_fmt_bytes(r['dense'])} | {_fmt_bytes(r['sparse'])} | "
            f"{_fmt_bytes(r['armor'])} | {r['armor'] / r['dense']:.4f} |"
        )
    t = rep["total_bytes"]
    lines.append(
        f"| **total** | | {_fmt_bytes(t['dense'])} | {_fmt_bytes(t['sparse'])} ({rep['sparse_ratio']:.4f}) | "
        f"{_fmt_bytes(t['armor'])} | **{rep['armor_ratio']:.4f}** |"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# model-level helpers
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def time_prefill(model: nn.Module, input_ids: Tensor, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Median time of one forward over ``input_ids`` ``(batch, seq)`` without a KV cache (prompt processing).

    Returns ``{"batch", "prompt_tokens", "seconds", "tokens_per_s", "repeats"}`` with tokens/s counting every
    prompt token of the batch.
    """
    device = _model_device(model)
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sec = _median_seconds(
                lambda: model(input_ids=input_ids, attention_mask=mask, use_cache=False),
                device,
                repeats,
                warmup,
            )
    finally:
        model.train(was_training)
    batch, seq = input_ids.shape
    return {
        "batch": batch,
        "prompt_tokens": seq,
        "seconds": sec,
        "tokens_per_s": batch * seq / sec,
        "repeats": repeats,
    }


def time_generation(
    model: nn.Module, input_ids: Tensor, new_tokens: int, repeats: int = 1, warmup: int = 1
) -> dict[str, Any]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``input_ids`` (batch, seq), KV cache on.

    Returns ``{"batch", "prompt_tokens", "new_tokens", "seconds", "tokens_per_s", "prefill_seconds",
    "decode_tokens_per_s", "repeats"}``: ``tokens_per_s`` is generated tokens (all sequences) over the whole
    call; ``decode_tokens_per_s`` removes one cached prefill forward (timed separately) from it.
    """
    device = _model_device(model)
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    kwargs = {
        "attention_mask": mask,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # keeps EOS from ending the run early, so every run has the same length
        "do_sample": False,
        "pad_token_id": pad,
    }
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sec = _median_seconds(lambda: model.generate(input_ids, **kwargs), device, repeats, warmup)
            pre = _median_seconds(
                lambda: model(input_ids=input_ids, attention_mask=mask, use_cache=True),
                device,
                repeats,
                warmup,
            )
            out = model.generate(input_ids, **kwargs)
    finally:
        model.train(was_training)
    batch, seq = input_ids.shape
    made = out.shape[1] - seq
    decode = sec - pre
    return {
        "batch": batch,
        "prompt_tokens": seq,
        "new_tokens": made,
        "seconds": sec,
        "tokens_per_s": batch * made / sec,
        "prefill_seconds": pre,
        "decode_tokens_per_s": batch * max(made - 1, 0) / decode if decode > 0 else None,
        "repeats": repeats,
    }


def _bench_models(
    folders: list[str], dtype: torch.dtype, device: torch.device, prompt: int, new: int, repeats: int, warmup: int
) -> int:
    """Prefill and generation speed of whole models: dense Hugging Face folders or folders pruned by armor."""
    from ..model.io import is_pruned_folder, load_model

    print(f"\nmodel-level: prompt {prompt} tokens (batch 1), {new} generated tokens, median of {repeats}\n")
    print("| model | kind | prefill tokens/s | generation tokens/s | decode tokens/s | weight bytes |")
    print("|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for folder in folders:
        pruned = is_pruned_folder(folder)
        model = load_model(folder, dtype=dtype, device=device)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=gen)
        pre = time_prefill(model, ids, repeats=repeats, warmup=warmup)
        gen_stats = time_generation(model, ids, new, repeats=max(1, repeats // 2), warmup=1)
        unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied embeddings count once
        stored = sum(t.numel() * t.element_size() for t in unique.values())
        decode = gen_stats["decode_tokens_per_s"]
        print(
            f"| {folder} | {'pruned' if pruned else 'dense'} | {pre['tokens_per_s']:.1f} | "
            f"{gen_stats['tokens_per_s']:.2f} | {decode if decode is None else f'{decode:.2f}'} | {stored:,} |"
        )
        del model
    return 0


# ----------------------------------------------------------------------------------------------------
# CLI
def _parse_shapes(text: str) -> list[tuple[int, int]]:
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
    return shapes


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the layer-benchmark options to ``parser`` (for ``armor bench`` and benchmarks/bench_runtime.py)."""
    parser.add_argument(
        "--shapes",
        type=_parse_shapes,
        default=None,
        help=f"preset ({', '.join(SHAPE_SETS)}) or OUTxIN list, e.g. 4096x4096,11008x4096 "
        "(default: 'default' = Llama-2-7B + Qwen2.5-14B shapes; 'quick' with --quick)",
    )
    parser.add_argument(
        "--batches", type=_parse_ints, default=None, help="comma list (default 1,16,128,2048)"
    )
    parser.add_argument(
        "--dtype", choices=list(_DTYPES), default=None, help="default: float16 on CUDA, float32 on CPU"
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per point (default 20 CUDA, 5 CPU)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls first (default 3 CUDA, 2 CPU)"
    )
    parser.add_argument("--block-size", type=int, default=128, help="ARMOR wrapper block size (default 128)")
    parser.add_argument(
        "--armor-backend",
        default="auto",
        choices=["auto", "semi_structured", "dense", "folded"],
        help="force the ArmorLinear backend (default auto)",
    )
    parser.add_argument(
        "--sparse-backend",
        default="auto",
        choices=["auto", "semi_structured", "dense"],
        help="force the SparseLinear backend (default auto)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small CPU-friendly run: shapes 'quick', batches 1,16,128, 3 repeats, 1 warm-up",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="DIR",
        help="model-level instead: prefill and generation tokens/s of each folder (dense HF or pruned by armor)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length for --models (default 256)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens for --models (default 32)")
    parser.add_argument("--no-storage", action="store_true", help="skip the 7B storage report")
    parser.add_argument("--storage-only", action="store_true", help="only the 7B storage report")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for CPU runs (default: torch's choice)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write all records as JSON here")
    return parser


def bench_main(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe (see :func:`add_bench_arguments`), print Markdown; 0 on success."""
    dev_text = args.device
    if dev_text == "auto":
        dev_text = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_text)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked but CUDA is not available")
        return 2
    on_cuda = device.type == "cuda"
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.float32)
    shapes = args.shapes or (SHAPE_SETS["quick"] if args.quick else SHAPE_SETS["default"])
    batches = args.batches or ([1, 16, 128] if args.quick else list(DEFAULT_BATCHES))
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else (20 if on_cuda else 5))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (3 if on_cuda else 2))

    where = (
        torch.cuda.get_device_name(device)
        if on_cuda
        else f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    )
    if not on_cuda and hasattr(os, "getloadavg"):
        # CPU timings are only meaningful relative to what else runs on the machine
        where += f", load average at start {os.getloadavg()[0]:.2f}"
    print(f"# armor runtime bench\n\ntorch {torch.__version__}, device {device} ({where}), dtype {dtype}")
    if getattr(args, "models", None):
        return _bench_models(args.models, dtype, device, args.prompt_tokens, args.new_tokens, repeats, warmup)
    out: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "device_name": where}
    if not args.storage_only:
        print(
            f"shapes {shapes}, batches {batches}, repeats {repeats}, warm-up {warmup}, "
            f"block {args.block_size}\n"
        )
        records = run_layer_bench(
            shapes,
            batches,
            dtype,
            device,
            repeats,
            warmup,
            args.block_size,
            armor_backend=args.armor_backend,
            sparse_backend=args.sparse_backend,
        )
        print(format_layer_table(records))
        mem = records[0]["mem_method"] if records else ""
        print(
            f"\nspeed-up = dense median / method median (> 1 is faster); stored = packed state_dict bytes; "
            f"resident = stored + runtime caches; peak mem = {mem}"
        )
        out["layers"] = records
        if not on_cuda and hasattr(os, "getloadavg"):
            print(f"load average at end {os.getloadavg()[0]:.2f}")
    if not args.no_storage:
        rep = storage_report(block_size=args.block_size)
        print("\n" + format_storage_table(rep))
        out["storage"] = rep
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    return 0
