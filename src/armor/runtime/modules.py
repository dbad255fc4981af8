"""Inference modules for pruned layers: :class:`SparseLinear` (plain n:m) and :class:`ArmorLinear` (ARMOR).

Both keep their state in PACKED form (see :mod:`armor.runtime.packing`): ``values`` (kept core entries, model
dtype) and ``indices`` (uint8, 2 bits per kept entry for 2:4), plus ``a_blocks``/``b_blocks`` for ARMOR and an
optional ``bias``.  ``state_dict()`` holds exactly those tensors, so it can be written with safetensors as is
and the file is about 0.56x (2:4) / 0.61x (ARMOR, 128 blocks, 7B shapes) of the dense fp16 size.

Resident memory is the packed state: no dense copy of the core (or of ``W_hat``) is ever kept.  The one cache
is the semi-structured CUDA form of the core (itself compressed, about the packed size), built at the first
forward of the ``semi_structured`` backend, kept outside ``state_dict()``, rebuilt when the state changes
(``load_state_dict``, ``.to()``) and freed by :meth:`drop_cache`.  :meth:`resident_nbytes` counts state plus cache.

Backends: the table :data:`BACKENDS` (name, availability probe, matmul) is the one place a compute path is
described; ``module.backend`` is the request (``"auto"`` or a table name), ``module.active_backend`` says which
path ran last (or would run for one token before any forward) and :meth:`backend_for` answers for a given token
count.  ``"auto"`` takes, in table order, the first backend whose probe passes and whose ``auto_max_tokens``
covers the batch (on CUDA the Triton kernels for decoding-sized batches, on CPU the numba kernels), else the
transient-dense path.  Gradients always take the dense path (the only differentiable one).  A new backend is
one :class:`Backend` entry (probe, the two matmuls, the ``auto`` rule) plus its tests; the module's
``backend`` choices and ``armor bench --backends`` follow from the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..factors import block_product
from ..result import PruneResult
from . import gpu_kernels
from .gpu_kernels import TRITON_DTYPES, triton_available
from .kernels import kernel_dtypes, numba_available
from .ops import armor_matmul, armor_matmul_triton, nm_matmul, nm_matmul_triton, unpack_dense, unpack_dense_cuda
from .packing import pack_nm, packed_index_shape, unpack_nm

__all__ = [
    "ArmorLinear",
    "SparseLinear",
    "Backend",
    "BACKENDS",
    "BACKEND_CHOICES",
    "module_from_result",
    "empty_module_from_spec",
    "backend_status",
    "semi_structured_status",
    "packed_status",
    "triton_status",
    "state_nbytes",
    "CPU_PACKED_MAX_TOKENS",
    "TRITON_MAX_TOKENS",
]

_SEMI_DTYPES = (torch.float16, torch.bfloat16)

#: ``auto`` on CPU runs the packed kernels for token batches up to this many rows of ``x`` (per module dtype)
#: and the transient-dense path above.  Measured on the 7B shapes (benchmarks/RESULTS_runtime.md): packed beat
#: transient-dense for 2:4 and ARMOR at every timed batch up to 16 in both dtypes; at 64 transient-dense won
#: everywhere in bfloat16 and for ARMOR 4096x4096 in float32.  float16 was not measured and follows float32.
CPU_PACKED_MAX_TOKENS: dict[torch.dtype, int] = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 32}

#: ``auto`` on CUDA runs the Triton kernels for token batches up to this many rows and the transient-dense path
#: above: the crossover measured on an H200, float16, the 7B shapes (``bash benchmarks/gpu_session.sh``; the
#: figures are in benchmarks/RESULTS_runtime.md, GPU section): the packed kernel is about even with
#: transient-dense at one token and behind it from 4 tokens on.
TRITON_MAX_TOKENS = 1


def semi_structured_status(
    device: torch.device | str, dtype: torch.dtype, n: int = 2, m: int = 4
) -> str | None:
    """``None`` when 2:4 semi-structured kernels can be tried for this device/dtype/pattern, else why not."""
    device = torch.device(device)
    if (n, m) != (2, 4):
        return f"semi-structured kernels need the 2:4 pattern, this layer is {n}:{m}"
    if device.type != "cuda":
        return f"semi-structured kernels need a CUDA device, the module is on {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(device) < (8, 0):
        cap = torch.cuda.get_device_capability(device)
        return f"semi-structured kernels need compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
    if dtype not in _SEMI_DTYPES:
        return f"semi-structured kernels need float16 or bfloat16, the module is {dtype}"
    return None


def packed_status(device: torch.device | str, dtype: torch.dtype, n: int = 2, m: int = 4) -> str | None:
    """``None`` when the packed CPU kernels can run for this device/dtype, else why not."""
    device = torch.device(device)
    if not numba_available():
        return "the packed CPU kernels need numba, which is not installed (pip install numba)"
    if device.type != "cpu":
        return f"the packed kernels run on CPU, the module is on {device}"
    if dtype not in kernel_dtypes():
        return f"the packed kernels support float32, bfloat16 and float16, the module is {dtype}"
    return None


def triton_status(device: torch.device | str, dtype: torch.dtype, n: int = 2, m: int = 4) -> str | None:
    """``None`` when the Triton kernels can run for this device/dtype, else why not.  They run on CUDA, and on
    CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    device = torch.device(device)
    if not triton_available():
        return "the Triton kernels need triton, which is not installed (pip install triton)"
    if device.type != "cuda" and not (device.type == "cpu" and gpu_kernels._interpreting()):
        return f"the Triton kernels run on CUDA, the module is on {device}"
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels support float16, bfloat16 and float32, the module is {dtype}"
    return None


def _always(device: torch.device | str, dtype: torch.dtype, n: int = 2, m: int = 4) -> str | None:
    return None


def _to_semi_structured(dense: Tensor) -> Tensor:
    """Compress a 2:4 dense CUDA matrix; cuSPARSELt when present, CUTLASS otherwise."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        try:
            return to_sparse_semi_structured(dense)
        except RuntimeError:
            pass  # e.g. a shape cuSPARSELt rejects; CUTLASS has its own constraints, try it
    return SparseSemiStructuredTensorCUTLASS.from_dense(dense)


def state_nbytes(module: nn.Module) -> int:
    """Bytes of every tensor in ``module.state_dict()`` (what a safetensors file of it holds, bar header)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _tensor_nbytes(obj: Any) -> int:
    if type(obj) is Tensor:
        return obj.numel() * obj.element_size()
    total = 0
    if isinstance(obj, Tensor):  # semi-structured subclass: count its compressed parts
        for attr in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask"):
            part = getattr(obj, attr, None)
            if isinstance(part, Tensor):
                total += part.numel() * part.element_size()
    return total


class _PackedNMLinear(nn.Module):
    """Shared machinery: packed core storage, the semi-structured cache and backend choice."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        m: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
        backend: str,
    ) -> None:
        super().__init__()
        if in_features % m:
            raise ValueError(f"in_features={in_features} is not a multiple of m={m}")
        if not dtype.is_floating_point:
            raise TypeError(f"module dtype must be floating point, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.n = n
        self.m = m
        kept = in_features // m * n
        # Parameters (frozen) rather than buffers so that model.parameters()/model.dtype see them and the
        # parameter count of a pruned model is its stored count; indices are integers, hence a buffer.
        self.values = nn.Parameter(
            torch.zeros(out_features, kept, dtype=dtype, device=device), requires_grad=False
        )
        idx_shape = packed_index_shape(out_features, in_features, n, m)
        self.register_buffer("indices", torch.zeros(idx_shape, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self._cache: dict[str, tuple[tuple, Any]] = {}
        self._last_backend: str | None = None
        self._auto: tuple[tuple[str, int], ...] | None = None  # memo of auto's plan: (backend, up to this many tokens)
        self.backend = backend

    # -- backend choice ----------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Requested backend: ``"auto"`` or a name of :data:`BACKENDS`."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKEND_CHOICES:
            raise ValueError(
                f"unknown backend {value!r} for {type(self).__name__}; choose one of {BACKEND_CHOICES}"
            )
        self._backend = value
        if value != "semi_structured":
            self.drop_cache()  # only the semi-structured path uses the cache: do not hold its memory
        self._last_backend = None
        self._auto = None

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def active_backend(self) -> str:
        """The compute path the last forward took (before any forward: the one a single token would take).

        Raises RuntimeError when a forced backend cannot run here."""
        if self._last_backend is not None:
            return self._last_backend
        return self.backend_for(1)

    def backend_for(self, n_tokens: int) -> str:
        """The compute path a forward over ``n_tokens`` rows of input takes now (without gradients).

        Raises RuntimeError when a forced backend cannot run here."""
        if self._backend == "auto":
            plan = self._auto
            if plan is None:
                plan = _auto_plan(self.device, self.dtype, self.n, self.m)
                if not torch.compiler.is_compiling():  # a memo set while tracing would fail the graph's guards
                    self._auto = plan  # memo: the device/dtype probes cost more than a small forward
            return next((name for name, limit in plan if n_tokens <= limit), "dense")
        why = backend_status(self._backend, self.device, self.dtype, self.n, self.m)
        if why is not None:
            raise RuntimeError(f"backend {self._backend!r} was forced but cannot run: {why}")
        return self._backend

    def _choose(self, x: Tensor) -> str:
        n_tokens = x.numel() // self.in_features if self.in_features else 0
        backend = self.backend_for(n_tokens)
        if backend != "dense" and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            backend = "dense"  # the only differentiable path
        self._last_backend = backend
        return backend

    # -- the semi-structured cache -----------------------------------------------------------------------
    def _state_key(self) -> tuple:
        # data_ptr + version counter change on .to(), load_state_dict's in-place copy and any in-place edit
        # (inference tensors have no version counter; they cannot be edited outside inference mode anyway).
        return tuple(
            (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype) for t in (self.values, self.indices)
        )

    def _cached(self, name: str, build) -> Any:
        key = self._state_key()
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        self._cache.pop(name, None)  # free the stale copy before building the new one
        # Built as a normal tensor even under inference_mode, so a cache made during an evaluation can still
        # be used later by ordinary (e.g. no_grad) forwards.
        with torch.inference_mode(False), torch.no_grad():
            obj = build()
        self._cache[name] = (key, obj)
        return obj

    def drop_cache(self) -> None:
        """Free the semi-structured copy built for the forward (rebuilt at the next forward)."""
        self._cache.clear()

    def cache_nbytes(self) -> int:
        """Bytes held by the runtime cache (only the semi-structured CUDA form; 0 on CPU)."""
        return sum(_tensor_nbytes(obj) for _, obj in self._cache.values())

    def resident_nbytes(self) -> int:
        """Bytes this module keeps between forwards: its packed state plus the runtime cache."""
        return self.stored_nbytes() + self.cache_nbytes()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to()/.half()/.cuda() make every cache stale; free them now rather than at the next forward.
        self.drop_cache()
        self._last_backend = None
        self._auto = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.drop_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _dense_core(self) -> Tensor:
        """The unpacked ``(out, in)`` core in the module dtype: transient, never stored on the module."""
        if not (torch.is_grad_enabled() and self.values.requires_grad):
            if backend_status("packed", self.device, self.dtype, self.n, self.m) is None:
                return unpack_dense(self.values, self.indices, self.n, self.m)  # one pass, no index tensors
            if self.device.type == "cuda" and triton_available():
                return unpack_dense_cuda(self.values, self.indices, self.in_features, self.n, self.m)
        return unpack_nm(self.values, self.indices, self.in_features, self.n, self.m)

    def _semi_core(self) -> Tensor:
        # Unpacked straight into the compressor: the dense core is not kept next to the compressed copy.
        return self._cached(
            "semi_core",
            lambda: _to_semi_structured(
                unpack_nm(self.values, self.indices, self.in_features, self.n, self.m).contiguous()
            ),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} takes inputs of {self.in_features} features (the last "
                             f"dimension), got an input of shape {tuple(x.shape)}")
        backend = BACKENDS[self._choose(x)]
        matmul = backend.armor if isinstance(self, ArmorLinear) else backend.sparse
        # an input of another dtype is read in the module's on every path (the packed kernels took any dtype, the
        # dense path raised: a call's outcome must not depend on how many tokens it has)
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        y = matmul(self, x2).reshape(*x.shape[:-1], self.out_features)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # every path returns autocast's dtype, as F.linear (dense) does
            y = y.to(torch.get_autocast_dtype(device))
        return y

    def _with_bias(self, y: Tensor) -> Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.dtype)

    # -- public helpers ----------------------------------------------------------------------------------
    # No ``weight`` attribute: code that looks for one (``getattr(m, "weight", None)``) must not get a dense
    # matrix built behind its back; :meth:`dense_weight` builds it on purpose.
    def dense_weight(self) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def stored_nbytes(self) -> int:
        """Bytes of the packed state (what ``state_dict()`` / a safetensors file holds)."""
        return state_nbytes(self)

    def _base_spec(self, kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n": self.n,
            "m": self.m,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
            f"bias={self.bias is not None}, dtype={self.dtype}, backend={self._backend}"
        )


class SparseLinear(_PackedNMLinear):
    """A plain n:m sparse linear layer ``y = (W ⊙ M) x + bias`` (baselines: magnitude, Wanda, SparseGPT)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 2,
        m: int = 4,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, n, m, bias, dtype, device, backend)

    def dense_weight(self) -> Tensor:
        """The pruned weight ``(out, in)`` in the module dtype."""
        return unpack_nm(self.values.detach(), self.indices, self.in_features, self.n, self.m)

    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :func:`empty_module_from_spec` rebuilds an empty twin."""
        return {**self._base_spec("sparse"), "block_size_out": None, "block_size_in": None}


class ArmorLinear(_PackedNMLinear):
    """An ARMOR layer ``y = A' (S (B' x)) + bias`` with block-diagonal ``A'`` ``(P, bo, bo)``,
    ``B'`` ``(Q, bi, bi)`` and an n:m sparse core ``S`` ``(out, in)``; see docs/algorithm.md §7.

    In row-major batch form ``Y = ((X B'^T) S^T) A'^T``: the wrappers are applied as batched ``b x b`` matmuls
    over the feature dimension viewed as ``(..., Q, bi)`` / ``(..., P, bo)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size_out: int,
        block_size_in: int,
        n: int = 2,
        m: int = 4,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        for name, dim, b in (("out", out_features, block_size_out), ("in", in_features, block_size_in)):
            if b < 1 or dim % b:
                raise ValueError(f"block_size_{name}={b} does not divide {name}_features={dim}")
        super().__init__(in_features, out_features, n, m, bias, dtype, device, backend)
        self.block_size_out = block_size_out
        self.block_size_in = block_size_in
        p, q = out_features // block_size_out, in_features // block_size_in
        eye_o = torch.eye(block_size_out, dtype=dtype, device=device).expand(p, -1, -1).clone()
        eye_i = torch.eye(block_size_in, dtype=dtype, device=device).expand(q, -1, -1).clone()
        self.a_blocks = nn.Parameter(eye_o, requires_grad=False)
        self.b_blocks = nn.Parameter(eye_i, requires_grad=False)

    @staticmethod
    def _blocks(x2: Tensor, blocks: Tensor) -> Tensor:
        """``x2`` ``(T, k*b)`` times the transposed block diagonal: block ``j`` of a row -> ``x_j B_j^T``."""
        t = x2.shape[0]
        k, b, _ = blocks.shape
        dtype = x2.dtype
        if x2.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            # float32 sums as on the packed path (CPU float16 bmm has no fast kernel either); the float32
            # copies are transient and the size of the wrappers, not of the layer.
            x2, blocks = x2.float(), blocks.float()
        # (k, T, b) @ (k, b, b): one bmm over the k blocks.
        y = torch.bmm(x2.reshape(t, k, b).transpose(0, 1), blocks.transpose(1, 2))
        return y.transpose(0, 1).reshape(t, k * b).to(dtype)

    def _reconstruct(self) -> Tensor:
        core = unpack_nm(self.values, self.indices, self.in_features, self.n, self.m)
        # product in at least float32, one rounding to the module dtype at the end
        ct = torch.promote_types(self.dtype, torch.float32)
        w = block_product(self.a_blocks.to(ct), core.to(ct), self.b_blocks.to(ct))
        return w.to(self.dtype)

    def dense_weight(self) -> Tensor:
        """The reconstruction ``W_hat = A' S B'`` ``(out, in)`` in the module dtype (computed in float32+)."""
        with torch.no_grad():
            return self._reconstruct()

    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :func:`empty_module_from_spec` rebuilds an empty twin."""
        return {
            **self._base_spec("armor"),
            "block_size_out": self.block_size_out,
            "block_size_in": self.block_size_in,
        }

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocks=({self.block_size_out}, {self.block_size_in})"


def module_from_result(
    result: PruneResult,
    bias: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> ArmorLinear | SparseLinear:
    """The inference module of a pruned layer: :class:`ArmorLinear` if ``result.has_wrappers`` else
    :class:`SparseLinear`, with values, wrapper blocks and bias in ``dtype`` on ``device`` (default: the
    result's device).  Raises ValueError when the mask is not ``result.n:result.m`` or shapes disagree."""
    device = result.core.device if device is None else torch.device(device)
    out_f, in_f = result.core.shape
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    values, idx = pack_nm((result.core * result.mask).float(), result.mask, result.n, result.m)
    mod: ArmorLinear | SparseLinear
    if result.has_wrappers:
        a, b = result.a_blocks, result.b_blocks
        assert a is not None and b is not None
        p, bo, bo2 = a.shape
        q, bi, bi2 = b.shape
        if bo != bo2 or bi != bi2 or p * bo != out_f or q * bi != in_f:
            raise ValueError(
                f"wrapper blocks {tuple(a.shape)} / {tuple(b.shape)} do not tile a core of shape "
                f"{(out_f, in_f)}"
            )
        mod = ArmorLinear(in_f, out_f, bo, bi, result.n, result.m, bias is not None, dtype, device, backend)
        with torch.no_grad():
            mod.a_blocks.copy_(a)
            mod.b_blocks.copy_(b)
    else:
        mod = SparseLinear(in_f, out_f, result.n, result.m, bias is not None, dtype, device, backend)
    with torch.no_grad():
        mod.values.copy_(values)
        mod.indices.copy_(idx)
        if bias is not None:
            mod.bias.copy_(bias)
    return mod


def empty_module_from_spec(
    spec: dict[str, Any],
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> ArmorLinear | SparseLinear:
    """A module of the shapes ``spec`` describes (see ``spec()``), zero-filled, ready for load_state_dict."""
    kind = spec.get("type")
    common = {
        "in_features": int(spec["in_features"]),
        "out_features": int(spec["out_features"]),
        "n": int(spec.get("n", 2)),
        "m": int(spec.get("m", 4)),
        "bias": bool(spec.get("bias", False)),
        "dtype": dtype,
        "device": device,
        "backend": backend,
    }
    if kind == "armor":
        return ArmorLinear(
            block_size_out=int(spec["block_size_out"]), block_size_in=int(spec["block_size_in"]), **common
        )
    if kind == "sparse":
        return SparseLinear(**common)
    raise ValueError(f"unknown module type {kind!r} in spec (expected 'armor' or 'sparse')")


# ------------------------------------------------------------------------------------------------------------
# The backend table.  Each matmul maps ``x2`` ``(T, in)`` to ``(T, out)`` in the module dtype, bias included.
@dataclass(frozen=True)
class Backend:
    """One compute path of the packed modules."""

    name: str
    #: ``(device, dtype, n, m) -> None`` when the path can run there, else why not
    status: Callable[[torch.device, torch.dtype, int, int], str | None]
    sparse: Callable[[SparseLinear, Tensor], Tensor]
    armor: Callable[[ArmorLinear, Tensor], Tensor]
    #: ``(device, dtype) -> n``: ``auto`` takes this path up to ``n`` tokens; None: only when asked for
    auto_max_tokens: Callable[[torch.device, torch.dtype], int] | None
    summary: str


def _armor_around(core: Callable[[ArmorLinear, Tensor], Tensor]) -> Callable[[ArmorLinear, Tensor], Tensor]:
    """ARMOR as three steps: ``B'`` and ``A'`` as batched block matmuls around ``core`` (the core's matmul)."""

    def matmul(mod: ArmorLinear, x2: Tensor) -> Tensor:
        return mod._with_bias(mod._blocks(core(mod, mod._blocks(x2, mod.b_blocks)), mod.a_blocks))

    return matmul


def _semi_core(mod: _PackedNMLinear, x2: Tensor) -> Tensor:
    return F.linear(x2.contiguous(), mod._semi_core())


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "triton",
            triton_status,
            lambda mod, x2: nm_matmul_triton(mod.values, mod.indices, x2, mod.n, mod.m, mod.bias),
            lambda mod, x2: armor_matmul_triton(
                mod.b_blocks, mod.values, mod.indices, mod.a_blocks, x2, mod.n, mod.m, mod.bias
            ),
            lambda device, dtype: TRITON_MAX_TOKENS if device.type == "cuda" else 0,
            "Triton kernels straight from the packed state (armor.runtime.gpu_kernels); CUDA; graph-capturable",
        ),
        Backend(
            "packed",
            packed_status,
            lambda mod, x2: mod._with_bias(nm_matmul(mod.values, mod.indices, x2, mod.n, mod.m)),
            lambda mod, x2: mod._with_bias(
                armor_matmul(mod.b_blocks, mod.values, mod.indices, mod.a_blocks, x2, mod.n, mod.m)
            ),
            lambda device, dtype: CPU_PACKED_MAX_TOKENS.get(dtype, 0),
            "numba kernels straight from the packed state (armor.runtime.kernels); CPU; float32 sums",
        ),
        Backend(
            "semi_structured",
            semi_structured_status,
            lambda mod, x2: mod._with_bias(_semi_core(mod, x2)),
            _armor_around(_semi_core),
            None,
            "2:4 sparse tensor cores (torch.sparse semi-structured, cached compressed core); CUDA, 16-bit, 2:4",
        ),
        Backend(
            "dense",
            _always,
            lambda mod, x2: F.linear(x2, mod._dense_core(), mod.bias),
            _armor_around(lambda mod, h: F.linear(h, mod._dense_core())),
            None,
            "the core unpacked to a transient dense matrix for the call, then F.linear; the differentiable path",
        ),
    )
}
#: what ``module.backend`` accepts
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)


# A forward asks these two while dynamo may be tracing it: their answers depend only on the arguments and on what
# is installed, so dynamo takes them as constants of the graph instead of tracing the probes (which read
# environment variables and compile a numba function).
@torch.compiler.assume_constant_result
def backend_status(name: str, device: torch.device | str, dtype: torch.dtype, n: int = 2, m: int = 4) -> str | None:
    """``None`` when backend ``name`` can run for this device/dtype/pattern, else why not."""
    return BACKENDS[name].status(torch.device(device), dtype, n, m)


@torch.compiler.assume_constant_result
def _auto_plan(device: torch.device, dtype: torch.dtype, n: int, m: int) -> tuple[tuple[str, int], ...]:
    """``auto``'s plan: ``(backend, up to this many tokens)`` in table order, for the backends that can run."""
    return tuple(
        (b.name, b.auto_max_tokens(device, dtype))
        for b in BACKENDS.values()
        if b.auto_max_tokens is not None and b.status(device, dtype, n, m) is None
    )
