"""Layer benchmark: dense ``F.linear`` vs plain 2:4 (:class:`~armor.runtime.SparseLinear`) vs ARMOR
(:class:`~armor.runtime.ArmorLinear`) on each backend, per-call wall time or GPU kernel time, stored and resident
bytes, and the crossover batch where dense wins.  Returns records; :mod:`armor.cli.bench` formats them.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..result import PruneResult
from ..runtime.modules import BACKENDS, empty_module_from_spec, module_from_result, state_nbytes
from ..sparsity import nm_supports
from .memory import rss_bytes

__all__ = [
    "SHAPE_SETS",
    "DEFAULT_BATCHES",
    "LLAMA7B_STACK",
    "default_backends",
    "random_nm_result",
    "run_layer_bench",
    "crossover",
    "storage_report",
    "median_seconds",
    "sync",
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
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    """The backends :func:`run_layer_bench` times by default: those ``auto`` may take on the device, then
    transient dense."""
    device = torch.device(device)
    fast = [
        b.name for b in BACKENDS.values()
        if b.auto_max_tokens is not None and b.auto_max_tokens(device, torch.float16) > 0
        and b.status(device, torch.float16, 2, 4) is None
    ]  # fmt: skip
    return (*fast, "dense")


# ----------------------------------------------------------------------------------------------------
# layer benchmark
def _kernel_seconds_per_call(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Mean GPU time per call of ``fn`` spent in kernels and memsets (the profiler's device events), over
    ``calls`` calls: what the call costs the GPU once the per-call host work (Python, the library's own host
    code such as cuSPARSELt's plan set-up) is out of the way, as in a CUDA-graph serving engine.  (Graph capture
    itself is not used: the cuSPARSELt path of torch 2.11 faults when its captured graph is replayed.)"""
    sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not device_events:
        raise RuntimeError("the profiler recorded no CUDA kernels: kernel timing needs CUPTI")
    return sum(e.time_range.elapsed_us() for e in device_events) * 1e-6 / calls


def _copies(stored: int, device: torch.device) -> int:
    """Layer copies one timed call walks through on CUDA, so that their weights together are four times the
    L2 cache: each call then reads its weights from device memory, as a decode step does (one layer's weights
    would otherwise stay in L2 between repeated calls and time the cache)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return max(1, -(-4 * l2 // max(stored, 1)))


def _load_layer(proto: nn.Module, backend: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A fresh module of ``proto``'s spec on ``device`` with its state loaded (how a saved model comes back)."""
    layer = empty_module_from_spec(proto.spec(), dtype=dtype, device=device, backend=backend)
    layer.load_state_dict(proto.state_dict())
    return layer


def _build_layer(
    proto: Tensor | nn.Module, backend: str, x: Tensor, device: torch.device, warmup: int
) -> dict[str, Any]:
    """Build one layer from ``proto`` on ``device`` (as many copies as :func:`_copies` asks; ``fn`` calls each
    once) and run its warm-up calls, inside a memory probe."""
    dense = isinstance(proto, Tensor)
    with _MemProbe(device) as probe:
        if dense:
            stored = proto.numel() * proto.element_size()
            copies = [proto.to(device=device, copy=True) for _ in range(_copies(stored, device))]
            call = partial(F.linear, x)
        else:
            stored = proto.stored_nbytes()
            copies = [_load_layer(proto, backend, x.dtype, device) for _ in range(_copies(stored, device))]

            def call(layer: nn.Module) -> Tensor:
                return layer(x)

        def fn() -> Tensor:  # the timed call: no branch per copy
            for c in copies:
                out = call(c)
            return out

        for _ in range(max(1, warmup)):  # at least one: it builds the lazy semi-structured cache on CUDA
            fn()
        sync(device)
    if dense:
        active, resident = "F.linear", stored
    else:
        active, resident = copies[0].active_backend, copies[0].resident_nbytes()  # after a forward: what ran
    return {
        "fn": fn,
        "copies": len(copies),
        "active_backend": active,
        "stored_bytes": stored,
        "resident_bytes": resident,
        "peak_mem_bytes": probe.peak // len(copies),
        "mem_method": probe.method,
    }


def _graph_seconds_per_call(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Mean wall time of one replay of ``fn`` captured in a CUDA graph, over ``calls`` replays: the call's cost
    once its launches are recorded (what a graph-captured decode step pays per layer)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        graph.replay()
    sync(device)
    return (time.perf_counter() - start) / calls


def _time_layers(built: dict, device: torch.device, repeats: int, timing: str) -> dict[Any, list[float]]:
    """Seconds per call of every built layer: interleaved wall-time rounds, or one figure per layer from the
    profiler's kernel times or from graph replays."""
    times: dict[Any, list[float]] = {key: [] for key in built}
    if timing == "wall":
        for _ in range(max(1, repeats)):
            for key, b in built.items():
                sync(device)
                start = time.perf_counter()
                b["fn"]()
                sync(device)
                times[key].append((time.perf_counter() - start) / b["copies"])
        return times
    per_call = _kernel_seconds_per_call if timing == "kernels" else _graph_seconds_per_call
    for key, b in built.items():
        times[key].append(per_call(b["fn"], device, max(1, repeats)) / b["copies"])
    return times


def _layer_record(key: tuple[str, str], b: dict, sec: list[float], dense: dict, point: dict) -> dict[str, Any]:
    median = statistics.median(sec)
    return {
        **point,
        "method": key[0],
        "backend": key[1],
        "active_backend": b["active_backend"],
        "median_s": median,
        "min_s": min(sec),
        "tokens_per_s": point["batch"] / median,
        "speedup_vs_dense": dense["median"] / median,
        "min_speedup_vs_dense": dense["min"] / min(sec),
        "stored_bytes": b["stored_bytes"],
        "resident_bytes": b["resident_bytes"],
        "resident_vs_dense": b["resident_bytes"] / dense["bytes"],
        "peak_mem_bytes": b["peak_mem_bytes"],
        "mem_method": b["mem_method"],
        "copies": b["copies"],
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
    timing: str = "wall",
) -> list[dict[str, Any]]:
    """Time ``y = layer(x)`` for ``x`` of shape ``(batch, in)``: dense ``F.linear`` vs :class:`SparseLinear`
    (2:4) vs :class:`ArmorLinear` (2:4 core, ``block_size`` wrapper blocks), each pruned layer on every backend
    in ``backends`` (default :func:`default_backends`), random weights and mask.

    ``timing``: ``"wall"`` (each call's wall time, CUDA synchronised; the layers of one (shape, batch) are timed
    in interleaved rounds so that a load change on a shared machine hits all of them alike), ``"kernels"``
    (CUDA: the mean GPU time of the call's kernels over ``repeats`` calls, :func:`_kernel_seconds_per_call`) or
    ``"graph"`` (CUDA: the mean time of one replay of the call captured in a CUDA graph).

    Returns one record per (shape, batch, method, backend): ``median_s`` and ``min_s`` over the rounds (equal
    for kernel and graph timing), ``tokens_per_s``, ``speedup_vs_dense`` (dense median / this median, > 1 is
    faster), ``min_speedup_vs_dense`` (the same from the fastest rounds), ``backend`` (requested) and
    ``active_backend`` (what ran), ``stored_bytes`` (packed ``state_dict``; the weight itself for dense),
    ``resident_bytes`` (state + runtime cache), ``peak_mem_bytes`` and ``mem_method``
    (``cuda_max_memory_allocated`` above the level before the build, or ``cpu_rss_delta``, indicative only).
    """
    device = torch.device(device)
    if timing not in ("wall", "kernels", "graph"):
        raise ValueError(f"timing must be 'wall', 'kernels' or 'graph', got {timing!r}")
    if timing != "wall" and device.type != "cuda":
        raise ValueError(f"{timing} timing needs a CUDA device, got {device}")
    backends = tuple(default_backends(device) if backends is None else backends)
    records: list[dict[str, Any]] = []
    for out_f, in_f in shapes:
        # Pack once per shape (CPU); each timed layer is then a fresh load of that state on the device, which
        # is also how a saved model comes back.
        dense_src = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * in_f**-0.5
        protos: dict[tuple[str, str], Any] = {("dense", "F.linear"): dense_src.to(dtype)}
        sparse = module_from_result(random_nm_result(out_f, in_f, None, seed=seed), None, dtype)
        armor = module_from_result(random_nm_result(out_f, in_f, block_size, seed=seed + 1), None, dtype)
        for backend in backends:
            protos[("sparse-2:4", backend)] = sparse
            protos[(f"armor-b{block_size}", backend)] = armor
        for batch in batches:
            with torch.inference_mode():
                x = torch.randn(batch, in_f).to(device=device, dtype=dtype)
                built = {key: _build_layer(p, key[1], x, device, warmup) for key, p in protos.items()}
                times = _time_layers(built, device, repeats, timing)
            ref = times[("dense", "F.linear")]
            dense_bytes = built[("dense", "F.linear")]["stored_bytes"]
            dense = {"median": statistics.median(ref), "min": min(ref), "bytes": dense_bytes}
            point = {
                "shape": f"{out_f}x{in_f}", "out_features": out_f, "in_features": in_f, "batch": batch,
                "dtype": str(dtype).replace("torch.", ""), "device": str(device), "repeats": repeats,
                "warmup": warmup, "timing": timing,
            }  # fmt: skip
            for key, b in built.items():
                records.append(_layer_record(key, b, times[key], dense, point))
                if progress is not None:
                    progress(records[-1])
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


