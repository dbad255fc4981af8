"""Layer and model timing for the runtime: dense ``F.linear`` vs plain 2:4 (:class:`SparseLinear`) vs ARMOR
(:class:`ArmorLinear`) on each backend, stored and resident bytes, and decode tokens/s / peak memory helpers
for any Hugging Face causal LM.

Library only (no argument parsing, no printing): ``armor bench`` (:mod:`armor.cli.bench`) and
``benchmarks/bench_runtime.py`` drive it; the ``format_*`` functions return Markdown strings.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import model_device
from ..result import PruneResult
from ..sparsity import nm_supports
from .modules import empty_module_from_spec, module_from_result, state_nbytes

__all__ = [
    "SHAPE_SETS",
    "DEFAULT_BATCHES",
    "LLAMA7B_STACK",
    "default_backends",
    "random_nm_result",
    "run_layer_bench",
    "crossover",
    "storage_report",
    "format_layer_table",
    "format_crossover_table",
    "format_storage_table",
    "format_model_table",
    "model_resident_bytes",
    "rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "time_prefill",
    "time_generation",
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
# timing and memory primitives
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


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux ``/proc``), or None where unavailable."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss` (Linux)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


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
            self.start = rss_bytes()
        self.peak: int | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            end = rss_bytes()
            self.peak = None if end is None or self.start is None else end - self.start


def default_backends(device: torch.device | str) -> tuple[str, ...]:
    """The backends :func:`run_layer_bench` times by default: the fast path of the device, then transient dense."""
    return ("semi_structured", "dense") if torch.device(device).type == "cuda" else ("packed", "dense")


# ----------------------------------------------------------------------------------------------------
# layer benchmark
def _kernel_seconds_per_call(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Mean GPU time per call of ``fn`` spent in kernels and memsets (the profiler's device events), over
    ``calls`` calls: what the call costs the GPU once the per-call host work (Python, the library's own host
    code such as cuSPARSELt's plan set-up) is out of the way, as in a CUDA-graph serving engine.  (Graph capture
    itself is not used: the cuSPARSELt path of torch 2.11 faults when its captured graph is replayed.)"""
    _sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not device_events:
        raise RuntimeError("the profiler recorded no CUDA kernels: kernel timing needs CUPTI")
    return sum(e.time_range.elapsed_us() for e in device_events) * 1e-6 / calls


def _build_layer(
    proto: Tensor | nn.Module, backend: str, x: Tensor, device: torch.device, warmup: int
) -> dict[str, Any]:
    """Build one layer from ``proto`` on ``device`` and run its warm-up calls, inside a memory probe."""
    with _MemProbe(device) as probe:
        if isinstance(proto, Tensor):
            w = proto.to(device=device, copy=True)

            def fn() -> Tensor:
                return F.linear(x, w)

            stored = w.numel() * w.element_size()
        else:
            layer = empty_module_from_spec(proto.spec(), dtype=x.dtype, device=device, backend=backend)
            layer.load_state_dict(proto.state_dict())

            def fn() -> Tensor:
                return layer(x)

            stored = layer.stored_nbytes()
        for _ in range(max(1, warmup)):  # at least one: it builds the lazy semi-structured cache on CUDA
            fn()
        _sync(device)
    if isinstance(proto, Tensor):
        active, resident = "F.linear", stored
    else:
        active, resident = layer.active_backend, layer.resident_nbytes()  # after a forward: what really ran
    return {
        "fn": fn,
        "active_backend": active,
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
    backends: Sequence[str] | None = None,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    kernel_time: bool = False,
) -> list[dict[str, Any]]:
    """Time ``y = layer(x)`` for ``x`` of shape ``(batch, in)``: dense ``F.linear`` vs :class:`SparseLinear`
    (2:4) vs :class:`ArmorLinear` (2:4 core, ``block_size`` wrapper blocks), each pruned layer on every backend
    in ``backends`` (default :func:`default_backends`), random weights and mask.

    For each (shape, batch) all layers are built and warmed up, then timed in interleaved rounds (one call of
    each per round) so that a load change on a shared machine hits all of them alike.

    Returns one record per (shape, batch, method, backend): ``median_s`` and ``min_s`` over ``repeats`` rounds
    (CUDA synchronised), ``tokens_per_s`` (= batch / median), ``speedup_vs_dense`` (dense median / this median,
    > 1 is faster), ``min_speedup_vs_dense`` (the same from the fastest rounds: on a shared machine the round
    least disturbed by other jobs), ``backend`` (requested) and ``active_backend`` (what ran), ``stored_bytes`` (packed
    ``state_dict``; the weight itself for dense), ``resident_bytes`` (what the module keeps between calls:
    state + runtime cache), ``peak_mem_bytes`` and ``mem_method``: ``cuda_max_memory_allocated`` (peak above
    the level before the build, over build + warm-up) or ``cpu_rss_delta`` (RSS after build + warm-up minus
    before; indicative only), ``timing`` (``"wall"`` or ``"kernels"``).

    ``kernel_time`` (CUDA only): instead of the wall time of each call, the mean GPU time of its kernels over
    ``repeats`` calls (:func:`_kernel_seconds_per_call`; then ``median_s == min_s``), for every layer, dense
    included.
    """
    device = torch.device(device)
    if kernel_time and device.type != "cuda":
        raise ValueError(f"kernel timing needs a CUDA device, got {device}")
    backends = tuple(default_backends(device) if backends is None else backends)
    records: list[dict[str, Any]] = []
    armor_name = f"armor-b{block_size}"
    for out_f, in_f in shapes:
        # Pack once per shape (CPU); each timed layer is then a fresh load of that state on the device, which
        # is also how a saved model comes back.
        dense_src = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * in_f**-0.5
        protos: dict[tuple[str, str], Any] = {("dense", "F.linear"): dense_src.to(dtype)}
        sparse = module_from_result(random_nm_result(out_f, in_f, None, seed=seed), None, dtype)
        armor = module_from_result(random_nm_result(out_f, in_f, block_size, seed=seed + 1), None, dtype)
        for backend in backends:
            protos[("sparse-2:4", backend)] = sparse
            protos[(armor_name, backend)] = armor
        for batch in batches:
            with torch.inference_mode():
                x = torch.randn(batch, in_f).to(device=device, dtype=dtype)
                built = {key: _build_layer(p, key[1], x, device, warmup) for key, p in protos.items()}
                times: dict[tuple[str, str], list[float]] = {key: [] for key in built}
                if kernel_time:
                    for key, b in built.items():
                        times[key].append(_kernel_seconds_per_call(b["fn"], device, max(1, repeats)))
                else:
                    for _ in range(max(1, repeats)):
                        for key, b in built.items():
                            _sync(device)
                            start = time.perf_counter()
                            b["fn"]()
                            _sync(device)
                            times[key].append(time.perf_counter() - start)
            dense_sec = statistics.median(times[("dense", "F.linear")])
            dense_min = min(times[("dense", "F.linear")])
            dense_bytes = built[("dense", "F.linear")]["stored_bytes"]
            for (method, backend), b in built.items():
                sec = statistics.median(times[(method, backend)])
                rec = {
                    "shape": f"{out_f}x{in_f}",
                    "out_features": out_f,
                    "in_features": in_f,
                    "batch": batch,
                    "method": method,
                    "backend": backend,
                    "active_backend": b["active_backend"],
                    "median_s": sec,
                    "min_s": min(times[(method, backend)]),
                    "tokens_per_s": batch / sec,
                    "speedup_vs_dense": dense_sec / sec,
                    "min_speedup_vs_dense": dense_min / min(times[(method, backend)]),
                    "stored_bytes": b["stored_bytes"],
                    "resident_bytes": b["resident_bytes"],
                    "resident_vs_dense": b["resident_bytes"] / dense_bytes,
                    "peak_mem_bytes": b["peak_mem_bytes"],
                    "mem_method": b["mem_method"],
                    "dtype": str(dtype).replace("torch.", ""),
                    "device": str(device),
                    "repeats": repeats,
                    "warmup": warmup,
                    "timing": "kernels" if kernel_time else "wall",
                }
                records.append(rec)
                if progress is not None:
                    progress(rec)
            del built, x
            gc.collect()
        del protos, dense_src, sparse, armor
        gc.collect()
    return records


def crossover(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (dtype, shape, method, backend) of :func:`run_layer_bench` records: the speed-up at every timed
    batch and ``dense_wins_from``, the smallest timed batch from which dense is at least as fast at every
    larger timed batch (None when the backend is still faster at the largest one)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["method"] != "dense":
            groups.setdefault((r["dtype"], r["shape"], r["method"], r["backend"]), []).append(r)
    rows = []
    for (dtype, shape, method, backend), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["batch"])
        dense_wins_from = None
        for r in reversed(recs):
            if r["speedup_vs_dense"] > 1.0:
                break
            dense_wins_from = r["batch"]
        rows.append(
            {
                "dtype": dtype,
                "shape": shape,
                "method": method,
                "backend": backend,
                "speedups": {r["batch"]: r["speedup_vs_dense"] for r in recs},
                "dense_wins_from": dense_wins_from,
            }
        )
    return rows


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
            f"{_fmt_bytes(r['stored_bytes'])} | {_fmt_bytes(r['resident_bytes'])} | {r['resident_vs_dense']:.4f} |"
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
            f"| {r['shape']} | {r['count']} | {_fmt_bytes(r['dense'])} | {_fmt_bytes(r['sparse'])} | "
            f"{_fmt_bytes(r['armor'])} | {r['armor'] / r['dense']:.4f} |"
        )
    t = rep["total_bytes"]
    lines.append(
        f"| **total** | | {_fmt_bytes(t['dense'])} | {_fmt_bytes(t['sparse'])} ({rep['sparse_ratio']:.4f}) | "
        f"{_fmt_bytes(t['armor'])} | **{rep['armor_ratio']:.4f}** |"
    )
    return "\n".join(lines)


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of model-level rows: ``name``, ``kind``, :func:`time_generation` fields, ``resident_bytes``
    (:func:`model_resident_bytes`), ``peak_rss_bytes`` and ``base_rss_bytes`` (RSS before loading)."""
    lines = [
        "| model | kind | prefill tokens/s | decode tokens/s | resident weights | peak RSS | peak RSS above start |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        decode = r.get("decode_tokens_per_s")
        peak, base = r.get("peak_rss_bytes"), r.get("base_rss_bytes")
        above = None if peak is None or base is None else peak - base
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['prefill_tokens_per_s']:.1f} | "
            f"{'n/a' if decode is None else f'{decode:.2f}'} | {_fmt_bytes(r['resident_bytes'])} | "
            f"{_fmt_bytes(peak)} | {_fmt_bytes(above)} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# model-level helpers
def model_resident_bytes(model: nn.Module) -> int:
    """Bytes a model keeps between forwards: every distinct parameter/buffer storage (tied weights once) plus
    the runtime caches of its packed modules."""
    seen: dict[tuple[int, int], int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    cache = sum(m.cache_nbytes() for m in model.modules() if hasattr(m, "cache_nbytes"))
    return sum(seen.values()) + cache


def time_prefill(model: nn.Module, input_ids: Tensor, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Median time of one forward over ``input_ids`` ``(batch, seq)`` without a KV cache (prompt processing).

    Returns ``{"batch", "prompt_tokens", "seconds", "tokens_per_s", "repeats"}`` with tokens/s counting every
    prompt token of the batch.
    """
    device = model_device(model)
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
    device = model_device(model)
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
