"""CPU kernels that compute straight from the packed n:m state (numba, optional).

Why numba: it installs from PyPI as wheels (numba + llvmlite) for every platform torch supports and compiles at
run time with its bundled LLVM, so a user needs no compiler; the compiled code is cached on disk
(``cache=True``).  The hot 2:4 loop is written as LLVM vector IR (``<16 x float>``, an ``@intrinsic``), which
LLVM lowers to whatever the CPU has (AVX-512, AVX2, NEON): numba's own loop vectoriser widens the 2-bit
position arithmetic to 64-bit lanes and runs about 2x slower.  See benchmarks/RESULTS_runtime.md.

Data layout (unchanged from :mod:`armor.runtime.packing`): ``values`` ``(out, kept)`` and ``indices``
``(out, kept / 4)`` uint8 for 2:4, 2 bits per kept entry, first entry in the lowest bits.  Nothing dense is
built: for a token batch ``x`` ``(T, in)`` the kernel forms, per call, the small ``(T, 4, kept)`` float32 table
``xs[t, j, k] = x[t, 4 * (k // 2) + j]`` (2 x the input size), so that every kept value ``k`` picks its input
with three vector selects on its position bits instead of a gather; each group of 4 output rows shares the
table loads; each row's values are software-prefetched a few cache lines ahead (four rows stream at once, more
than the hardware prefetcher keeps in flight).  Rows are split over numba's threads in units of 16 groups of
4 rows.
Values are read in their stored dtype (float32, bfloat16 or float16) and converted in registers; products are
summed in float32.  A bfloat16 layer fed bfloat16 inputs on a CPU with AVX512-BF16 builds the table in
bfloat16 and multiplies with ``vdpbf16ps`` (32 exact products per instruction, float32 sums).

Other n:m patterns (4:8, 1:4, ...) use a plain scalar loop over the same packed data (correct, not tuned).

Threads: each driver is compiled twice from one definition (:func:`_twins`): with ``parallel=True`` its
``prange`` splits the rows over numba's threads, with ``parallel=False`` numba runs the same ``prange`` as a
plain loop, which never touches the thread pool (on a busy machine each fork/join of the pool waits for a time
slice); one torch thread takes the serial twin.  The entry points that combine drivers (:func:`_entry`) are
twins too: the serial one compiled and cached, the parallel one plain Python, so that no cached function calls a
parallel one (numba caches such a caller as code that can crash a later process).

At the first launch, unless the user set ``NUMBA_THREADING_LAYER`` or numba's pool already runs, :func:`_launch`
picks numba's ``workqueue`` threading layer: the OpenMP layer starts a second libgomp pool next to torch's and
made decoding on small machines many times slower.  The choice is process-wide (numba starts one pool), which is
why it waits for the first launch of these kernels instead of happening at import.
"""

from __future__ import annotations

import functools
import os
import threading
import types as pytypes

import numpy as np
import torch
from torch import Tensor

try:  # optional dependency: without numba the modules run their pure-PyTorch path
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

try:  # advisory file locks for numba's on-disk cache (POSIX); elsewhere the cache runs as numba ships it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from .packing import index_bits

__all__ = ["numba_available", "kernel_dtypes", "nm_matmul", "armor_matmul", "unpack_dense"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# numba's workqueue threading layer aborts the process on concurrent launches from two Python threads; one
# launch at a time costs nothing here (a layer's forward is one launch).
_LAUNCH_LOCK = threading.Lock()
_launched = False
#: a call runs on numba's threads only when its work -- kept values x passes over them (one per 4 tokens) -- is
#: at least this: each parallel region costs a fork/join (60-90 us on a 2-core VM), which smaller calls never win
#: back (benchmarks/RESULTS_runtime.md, "Threads per call"; ``python benchmarks/cpu_threads.py``)
CPU_PARALLEL_MIN_WORK = 1 << 23


def numba_available() -> bool:
    """True when numba is importable, i.e. the ``packed`` CPU backend can run."""
    return numba is not None


@functools.cache
def _host_converts_half() -> bool:
    """float16 -> float32 in hardware: x86 needs F16C (else LLVM would call a runtime helper numba lacks)."""
    from llvmlite import binding

    if not binding.get_process_triple().startswith(("x86_64", "i686", "i386")):
        return True  # aarch64 / ppc64le / s390x convert half natively
    return bool(binding.get_host_cpu_features().get("f16c", False))


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The module dtypes the packed kernels support on this CPU (float16 where it converts half in hardware)."""
    if numba is None:
        return ()
    return _KERNEL_DTYPES if _host_converts_half() else _KERNEL_DTYPES[:2]


#: lock file in numba's cache folder that every save (exclusive) and load (shared) of these kernels holds
CACHE_LOCK_NAME = "armor-kernels.lock"


def _holding_lock(path: str, mode: int, call):
    """``call`` wrapped to run under ``flock(path, mode)``; unlocked where the lock file cannot be opened (a cache
    folder this process cannot write, where numba saves nothing either)."""

    @functools.wraps(call)
    def locked(*args, **kwargs):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return call(*args, **kwargs)
        try:
            fcntl.flock(fd, mode)
            return call(*args, **kwargs)
        finally:
            os.close(fd)  # closing drops the lock

    return locked


def _serialise_cache_io(dispatchers) -> None:
    """Make numba's on-disk cache safe for processes that compile at the same time.

    numba names the file of a new compilation by reading the function's index, taking the first free number and
    rewriting the index, without a lock: two processes compiling different signatures of one kernel at once can
    both take the same file, and the index then points one signature at the other's machine code (a crash or
    wrong sums in a later process).  Here each dispatcher's cache saves under an exclusive lock and loads under a
    shared one, so an index and its data files always change together.
    """
    if fcntl is None:
        return
    for dispatcher in dispatchers:
        cache = getattr(dispatcher, "_cache", None)
        folder = getattr(cache, "_cache_path", None)
        if folder is None or not hasattr(cache, "save_overload") or not hasattr(cache, "load_overload"):
            continue  # caching off, or a numba whose cache has another shape
        path = os.path.join(folder, CACHE_LOCK_NAME)
        cache.save_overload = _holding_lock(path, fcntl.LOCK_EX, cache.save_overload)
        cache.load_overload = _holding_lock(path, fcntl.LOCK_SH, cache.load_overload)


if numba is not None:
    _VEC = 16  # lanes of the vector loop: 16 kept values = 32 bits of positions = one uint32 per row
    _QUADS = 16  # groups of 4 rows per unit of work of the 2:4 kernel
    # how far ahead each row's values are prefetched; 2048 measured best of 512-4096 (benchmarks/RESULTS_runtime.md)
    _PREFETCH_BYTES = 2048

    def _value_kind(ty) -> str:
        """How the raw value bits are read: float32 as is, uint16 = bfloat16 bits, int16 = float16 bits."""
        dt = getattr(ty, "dtype", ty)
        if dt == types.float32:
            return "f32"
        if dt == types.uint16:
            return "bf16"
        if dt == types.int16:
            return "f16"
        raise TypeError(f"unsupported value type {dt}")

    def _to_f32(builder, val, kind: str, lanes: int | None):
        """Convert raw value bits (scalar or vector) of ``kind`` to float32, exactly."""
        f32 = ir.FloatType()
        if kind == "f32":
            return val
        if kind == "bf16":
            i32 = ir.IntType(32) if lanes is None else ir.VectorType(ir.IntType(32), lanes)
            out = f32 if lanes is None else ir.VectorType(f32, lanes)
            wide = builder.zext(val, i32)
            shift = ir.Constant(i32, 16) if lanes is None else ir.Constant(i32, [16] * lanes)
            return builder.bitcast(builder.shl(wide, shift), out)
        half = ir.HalfType() if lanes is None else ir.VectorType(ir.HalfType(), lanes)
        out = f32 if lanes is None else ir.VectorType(f32, lanes)
        return builder.fpext(builder.bitcast(val, half), out)

    @intrinsic
    def _as_f32(typingctx, val):
        """A stored value (float32, or the raw bits of bfloat16 / float16) as float32."""
        kind = _value_kind(val)

        def codegen(context, builder, sig, args):
            return _to_f32(builder, args[0], kind, None)

        return types.float32(val), codegen

    def _byte_ptr(builder, base, offset):
        return builder.gep(builder.bitcast(base, ir.IntType(8).as_pointer()), [offset])

    class _Dot24IR:
        """The LLVM IR of :func:`_dot24_rows`, in three steps: pointers (hoisted out of the loop), one word of 16
        kept entries per loop step, and the horizontal sums added to ``out``."""

        def __init__(self, context, builder, signature, args, kind: str, rows: int, toks: int) -> None:
            self.b, self.kind, self.rows, self.toks = builder, kind, rows, toks
            pairs = zip(signature.args[:4], args[:4], strict=True)
            arrays = [context.make_array(ty)(context, builder, a) for ty, a in pairs]
            self.va, self.ia, self.xa, self.oa = arrays
            self.strides = [cgutils.unpack_tuple(builder, a.strides, a.strides.type.count) for a in arrays]
            self.row0, self.tok0 = (self._i64(v) for v in args[4:6])
            self.i32, self.f32 = ir.IntType(32), ir.FloatType()
            self.vf, self.vi = ir.VectorType(self.f32, _VEC), ir.VectorType(self.i32, _VEC)
            self.elem_bytes = 4 if kind == "f32" else 2
            self.vraw = ir.VectorType(self.f32 if kind == "f32" else ir.IntType(16), _VEC)
            v_s, i_s, x_s, _ = self.strides
            self.v_rows = [self._at(self.va.data, self._mul(self._add(self.row0, r), v_s[0])) for r in range(rows)]
            self.i_rows = [self._at(self.ia.data, self._mul(self._add(self.row0, r), i_s[0])) for r in range(rows)]
            tok_offsets = [self._mul(self._add(self.tok0, t), x_s[0]) for t in range(toks)]
            self.x_toks = [
                [self._at(self.xa.data, builder.add(o, self._mul(j, x_s[1]))) for j in range(4)] for o in tok_offsets
            ]
            zero = ir.Constant(self.vf, None)
            self.accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(toks)] for _ in range(rows)]
            self.fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(self.vf, [self.vf] * 3), "llvm.fma.v16f32"
            )
            prefetch_ty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), self.i32, self.i32, self.i32])
            self.prefetch = cgutils.get_or_insert_function(builder.module, prefetch_ty, "llvm.prefetch.p0i8")

        def _i64(self, v):
            return self.b.sext(v, ir.IntType(64)) if v.type.width < 64 else v

        def _add(self, v, c: int):
            return self.b.add(v, ir.Constant(ir.IntType(64), c))

        def _mul(self, v, c):
            return self.b.mul(v if not isinstance(v, int) else ir.Constant(ir.IntType(64), v), c)

        def _at(self, base, offset):
            return _byte_ptr(self.b, base, offset)

        def _vec(self, values: list[int]):
            return ir.Constant(self.vi, values)

        def _prefetch(self, r: int, val_off) -> None:
            """Ask for row ``r``'s values ``_PREFETCH_BYTES`` ahead of ``val_off``: the hardware prefetcher alone
            keeps too few lines in flight for the four rows streamed at once."""
            if _PREFETCH_BYTES:
                ahead = self.b.gep(self.v_rows[r], [self.b.add(val_off, ir.Constant(val_off.type, _PREFETCH_BYTES))])
                self.b.call(self.prefetch, [ahead] + [ir.Constant(self.i32, v) for v in (0, 3, 1)])

        def _decode(self, r: int, w):
            """Row ``r``'s word ``w``: the two position bits of each of the 16 lanes and the 16 values (float32)."""
            b = self.b
            word = b.load(b.bitcast(b.gep(self.i_rows[r], [b.mul(w, ir.Constant(w.type, 4))]), self.i32.as_pointer()))
            first = b.insert_element(ir.Constant(self.vi, ir.Undefined), word, ir.Constant(self.i32, 0))
            pos = b.lshr(b.shuffle_vector(first, first, self._vec([0] * _VEC)), self._vec(list(range(0, 2 * _VEC, 2))))
            zero = self._vec([0] * _VEC)
            odd = b.icmp_unsigned("!=", b.and_(pos, self._vec([1] * _VEC)), zero)
            high = b.icmp_unsigned("!=", b.and_(pos, self._vec([2] * _VEC)), zero)
            val_off = b.mul(w, ir.Constant(w.type, _VEC * self.elem_bytes))
            self._prefetch(r, val_off)
            raw = b.load(b.bitcast(b.gep(self.v_rows[r], [val_off]), self.vraw.as_pointer()), align=self.elem_bytes)
            return odd, high, _to_f32(b, raw, self.kind, _VEC)

        def step(self, w) -> None:
            """One word (16 kept entries) of every row, for every token: select each entry's input, multiply-add."""
            b = self.b
            decoded = [self._decode(r, w) for r in range(self.rows)]
            x_off = b.mul(w, ir.Constant(w.type, _VEC * 4))
            for t in range(self.toks):
                cand = [
                    b.load(b.bitcast(b.gep(self.x_toks[t][j], [x_off]), self.vf.as_pointer()), align=4)
                    for j in range(4)
                ]
                for r, (odd, high, vals) in enumerate(decoded):
                    picked = b.select(high, b.select(odd, cand[3], cand[2]), b.select(odd, cand[1], cand[0]))
                    acc = b.load(self.accs[r][t])
                    b.store(b.call(self.fma, [vals, picked, acc]), self.accs[r][t])

        def finish(self) -> None:
            """Add each accumulator's 16 lanes (a pairwise tree) to its ``out`` entry."""
            b = self.b
            o_s = self.strides[3]
            for r in range(self.rows):
                for t in range(self.toks):
                    acc = b.load(self.accs[r][t])
                    width = _VEC
                    while width > 1:
                        width //= 2
                        half = ir.VectorType(self.i32, width)
                        lo = b.shuffle_vector(acc, acc, ir.Constant(half, list(range(width))))
                        hi = b.shuffle_vector(acc, acc, ir.Constant(half, list(range(width, 2 * width))))
                        acc = b.fadd(lo, hi)
                    total = b.extract_element(acc, ir.Constant(self.i32, 0))
                    off = b.add(self._mul(self._add(self.tok0, t), o_s[0]), self._mul(self._add(self.row0, r), o_s[1]))
                    dst = b.bitcast(self._at(self.oa.data, off), self.f32.as_pointer())
                    b.store(b.fadd(b.load(dst), total), dst)

    class _Dot24BF16IR(_Dot24IR):
        """The same product from a bfloat16 table and bfloat16 values with the CPU's bf16 dot-product instruction
        (AVX512-BF16 ``vdpbf16ps``: 32 products per instruction, exact, summed in float32): each loop step takes
        two words (32 kept entries)."""

        def _decode(self, r: int, w):
            b = self.b
            lanes = []
            for half in range(2):
                word_ptr = b.gep(self.i_rows[r], [b.mul(b.add(w, ir.Constant(w.type, half)), ir.Constant(w.type, 4))])
                word = b.load(b.bitcast(word_ptr, self.i32.as_pointer()))
                first = b.insert_element(ir.Constant(self.vi, ir.Undefined), word, ir.Constant(self.i32, 0))
                splat = b.shuffle_vector(first, first, self._vec([0] * _VEC))
                lanes.append(b.lshr(splat, self._vec(list(range(0, 2 * _VEC, 2)))))
            zero = self._vec([0] * _VEC)
            both = ir.Constant(ir.VectorType(self.i32, 2 * _VEC), list(range(2 * _VEC)))
            masks = []
            for bit in (1, 2):
                m_lo, m_hi = (b.icmp_unsigned("!=", b.and_(p, self._vec([bit] * _VEC)), zero) for p in lanes)
                masks.append(b.shuffle_vector(m_lo, m_hi, both))
            v32 = ir.VectorType(ir.IntType(16), 2 * _VEC)
            val_off = b.mul(w, ir.Constant(w.type, _VEC * 2))
            self._prefetch(r, val_off)
            val_ptr = b.gep(self.v_rows[r], [val_off])
            return masks[0], masks[1], b.load(b.bitcast(val_ptr, v32.as_pointer()), align=2)

        def step(self, w) -> None:
            b = self.b
            v32 = ir.VectorType(ir.IntType(16), 2 * _VEC)
            dot = cgutils.get_or_insert_function(
                b.module, ir.FunctionType(self.vf, [self.vf, self.vi, self.vi]), "llvm.x86.avx512bf16.dpbf16ps.512"
            )
            decoded = [self._decode(r, w) for r in range(self.rows)]
            x_off = b.mul(w, ir.Constant(w.type, _VEC * 2))
            for t in range(self.toks):
                ptrs = [b.bitcast(b.gep(self.x_toks[t][j], [x_off]), v32.as_pointer()) for j in range(4)]
                cand = [b.load(ptr, align=2) for ptr in ptrs]
                for r, (odd, high, vals) in enumerate(decoded):
                    picked = b.select(high, b.select(odd, cand[3], cand[2]), b.select(odd, cand[1], cand[0]))
                    acc = b.load(self.accs[r][t])
                    pair = [b.bitcast(vals, self.vi), b.bitcast(picked, self.vi)]
                    b.store(b.call(dot, [acc, *pair]), self.accs[r][t])

    @intrinsic(prefer_literal=True)
    def _dot24_rows(typingctx, values, idx, xs, out, row0, tok0, nwords, n_rows, n_tok):
        """``out[tok0 + t, row0 + r] += sum_k values[row0 + r, k] * x[tok0 + t, 4 (k // 2) + pos]`` over the
        first ``16 nwords`` kept entries, for ``r < n_rows`` and ``t < n_tok`` (both
        compile-time constants), from the position words in ``idx`` and the selection table ``xs``
        ``(T, 4, K16)``.  A bfloat16 table (raw bits, uint16) with bfloat16 values takes the CPU's bf16 dot
        product (:class:`_Dot24BF16IR`; ``nwords`` even)."""
        if not isinstance(n_rows, types.IntegerLiteral) or not isinstance(n_tok, types.IntegerLiteral):
            return None
        rows, toks = n_rows.literal_value, n_tok.literal_value
        kind = _value_kind(values)
        sig = types.void(values, idx, xs, out, row0, tok0, nwords, n_rows, n_tok)

        bf16_dot = xs.dtype == types.uint16
        if bf16_dot and kind != "bf16":
            raise TypeError("a bfloat16 selection table needs bfloat16 values")

        def codegen(context, builder, signature, args):
            gen = (_Dot24BF16IR if bf16_dot else _Dot24IR)(context, builder, signature, args, kind, rows, toks)
            per_step = 2 if bf16_dot else 1
            steps = builder.udiv(args[6], ir.Constant(args[6].type, per_step))
            with cgutils.for_range(builder, steps) as loop:
                gen.step(builder.mul(gen._i64(loop.index), ir.Constant(ir.IntType(64), per_step)))
            gen.finish()
            return context.get_dummy_value()

        return sig, codegen

    @njit(cache=True, inline="always")
    def _dot24_tail(values, idx, x, out, o, t, k_start):
        """Kept entries ``k_start..`` of row ``o`` for token ``t`` (scalar), added to ``out[t, o]``."""
        acc = numba.float32(0.0)
        for k in range(k_start, values.shape[1]):
            pos = (idx[o, k >> 2] >> ((k & 3) * 2)) & 3
            acc += _as_f32(values[o, k]) * _as_f32(x[t, 4 * (k >> 1) + pos])
        out[t, o] += acc

    def _renamed(fn, suffix: str, names: dict | None = None):
        """A copy of ``fn`` under the name ``<name><suffix>`` (numba's on-disk cache is keyed by the qualified
        name, so each copy keeps its own compilations), its globals overridden by ``names``."""
        scope = fn.__globals__ if names is None else {**fn.__globals__, **names}
        f = pytypes.FunctionType(fn.__code__, scope, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
        f.__qualname__ = fn.__qualname__ + suffix
        return f

    def _twins(driver, fastmath: bool = False):
        """``(serial, parallel)`` dispatchers of one driver: numba runs ``prange`` as ``range`` when not
        parallel."""
        return (
            njit(cache=True, fastmath=fastmath)(_renamed(driver, "_ser")),
            njit(parallel=True, cache=True, fastmath=fastmath)(_renamed(driver, "_par")),
        )

    @njit(cache=True)
    def _selection_table(x, kept):
        """``xs[t, j, k] = x[t, 4 (k // 2) + j]`` for ``k < 16 floor(kept / 16)``: each 2:4 group's 4 inputs,
        once per kept entry, so that a kept entry picks its input with selects instead of a gather."""
        n_tok = x.shape[0]
        k16 = kept // _VEC * _VEC
        xs = np.empty((n_tok, 4, k16), dtype=np.float32)
        for t in range(n_tok):
            for j in range(4):
                for k in range(k16):
                    xs[t, j, k] = x[t, 4 * (k >> 1) + j]
        return xs

    @njit(cache=True, inline="always")
    def _nm24_quad(values, idx, xs, out, row, nwords):
        """Rows ``row .. row+3``, every token, kept words ``0 .. nwords-1`` added to ``out``."""
        n_tok = out.shape[0]
        t = 0
        while t < n_tok:
            left = n_tok - t
            if left >= 4:
                _dot24_rows(values, idx, xs, out, row, t, nwords, 4, 4)
                t += 4
            elif left >= 2:
                _dot24_rows(values, idx, xs, out, row, t, nwords, 4, 2)
                t += 2
            else:
                _dot24_rows(values, idx, xs, out, row, t, nwords, 4, 1)
                t += 1

    def _nm24_driver(values, idx, x, xs, out):
        """2:4 core: units of ``_QUADS`` groups of 4 rows (plus one unit for the rows past the last full
        group), each row streamed once from start to end (a stream split in chunks loses its prefetched lines
        at every chunk edge: measured slower).  The table ``xs`` covers the first
        ``xs.shape[2]`` kept entries (a multiple of 16; of 32 for a bfloat16 table); scalar code does the rest."""
        n_rows, kept = values.shape
        nwords = xs.shape[2] // _VEC
        n_quads = n_rows // 4
        n_units = (n_quads + _QUADS - 1) // _QUADS
        for unit in prange(n_units + 1):
            if unit < n_units:
                lo = unit * _QUADS * 4
                hi = min(lo + _QUADS * 4, n_quads * 4)
                for row in range(lo, hi, 4):
                    _nm24_quad(values, idx, xs, out, row, nwords)
            else:
                lo = n_quads * 4
                hi = n_rows
                for row in range(lo, hi):
                    for t in range(x.shape[0]):
                        _dot24_rows(values, idx, xs, out, row, t, nwords, 1, 1)
            if nwords * _VEC < kept:
                for o in range(lo, hi):
                    for t in range(x.shape[0]):
                        _dot24_tail(values, idx, x, out, o, t, nwords * _VEC)

    def _nm_generic_driver(values, idx, x, out, n, m, bits):
        """Any n:m pattern, one row per step: ``out[t, o] = sum_k values[o, k] x[t, m (k // n) + pos(o, k)]``."""
        kept = values.shape[1]
        per_byte = 8 // bits
        field = (1 << bits) - 1
        for o in prange(values.shape[0]):
            for t in range(x.shape[0]):
                acc = numba.float32(0.0)
                for k in range(kept):
                    pos = (idx[o, k // per_byte] >> ((k % per_byte) * bits)) & field
                    acc += _as_f32(values[o, k]) * x[t, m * (k // n) + pos]
                out[t, o] = acc

    def _block_diag_driver(blocks, x, out):
        """Output feature ``r = q b + i``: ``out[t, r] = sum_j blocks[q, i, j] x[t, q b + j]``."""
        size = blocks.shape[1]
        for r in prange(blocks.shape[0] * size):
            q = r // size
            i = r - q * size
            base = q * size
            for t in range(x.shape[0]):
                acc = numba.float32(0.0)
                for j in range(size):
                    acc += _as_f32(blocks[q, i, j]) * x[t, base + j]
                out[t, r] = acc

    def _unpack_driver(values, idx, out, n, m, bits):
        """The dense core: zeros, then each kept value at its position (raw bits copied as is)."""
        kept = values.shape[1]
        per_byte = 8 // bits
        field = (1 << bits) - 1
        for o in prange(values.shape[0]):
            if n == 2 and m == 4 and kept % 4 == 0:
                # one byte of positions = two groups = 8 dense columns, written in one go
                for c in range(kept // 4):
                    b = idx[o, c]
                    base = 8 * c
                    for j in range(8):
                        out[o, base + j] = 0
                    out[o, base + (b & 3)] = values[o, 4 * c]
                    out[o, base + ((b >> 2) & 3)] = values[o, 4 * c + 1]
                    out[o, base + 4 + ((b >> 4) & 3)] = values[o, 4 * c + 2]
                    out[o, base + 4 + (b >> 6)] = values[o, 4 * c + 3]
            else:
                for c in range(out.shape[1]):
                    out[o, c] = 0
                for k in range(kept):
                    pos = (idx[o, k // per_byte] >> ((k % per_byte) * bits)) & field
                    out[o, m * (k // n) + pos] = values[o, k]

    _nm24_ser, _nm24_par = _twins(_nm24_driver)
    # fastmath: the scalar float32 sums may be reassociated, so that LLVM vectorises them
    _nm_generic_ser, _nm_generic_par = _twins(_nm_generic_driver, fastmath=True)
    _block_diag_ser, _block_diag_par = _twins(_block_diag_driver, fastmath=True)
    _unpack_ser, _unpack_par = _twins(_unpack_driver)

    # The entry points below are written once and built twice (:func:`_entry`): serial, compiled and cached, calling
    # the serial twins; parallel, as plain Python calling the parallel twins.  No cached function calls a parallel
    # one: numba's cache of such a caller, written after its callee was loaded from another process's cache, loads
    # as machine code that crashes (numba issue 8578; tests/test_runtime.py reproduces it across processes).
    _SERIAL = {"_nm24": _nm24_ser, "_nm_generic": _nm_generic_ser, "_block_diag": _block_diag_ser,
               "_unpack": _unpack_ser}  # fmt: skip
    _PARALLEL = {"_nm24": _nm24_par, "_nm_generic": _nm_generic_par, "_block_diag": _block_diag_par,
                 "_unpack": _unpack_par}  # fmt: skip

    def _entry(fn):
        """``(serial, parallel)`` of an entry point, each calling its own kind (later entry points see them)."""
        serial = njit(cache=True)(_renamed(fn, "_ser", _SERIAL))
        parallel = _renamed(fn, "_par", _PARALLEL)
        _SERIAL[fn.__name__], _PARALLEL[fn.__name__] = serial, parallel
        return serial, parallel

    def _core_into(values, idx, x, out, n, m, bits):
        if n == 2 and m == 4:
            out[:] = 0
            xs = _selection_table(x, values.shape[1])
            _nm24(values, idx, x, xs, out)  # noqa: F821 - bound per twin by _entry
        else:
            _nm_generic(values, idx, x, out, n, m, bits)  # noqa: F821

    _entry(_core_into)  # bound before the entry points that call it

    def _unpack_forward(values, idx, n, m, bits):
        out = np.empty((values.shape[0], values.shape[1] // n * m), dtype=values.dtype)
        _unpack(values, idx, out, n, m, bits)  # noqa: F821
        return out

    def _sparse_forward(values, idx, x, n, m, bits):
        out = np.empty((x.shape[0], values.shape[0]), dtype=np.float32)
        _core_into(values, idx, x, out, n, m, bits)
        return out

    def _sparse_forward_bf16(values, idx, x, xs):
        out = np.zeros((x.shape[0], values.shape[0]), dtype=np.float32)
        _nm24(values, idx, x, xs, out)  # noqa: F821
        return out

    def _armor_forward(b_blocks, values, idx, a_blocks, x, n, m, bits):
        n_tok = x.shape[0]
        h = np.empty((n_tok, x.shape[1]), dtype=np.float32)
        _block_diag(b_blocks, x, h)  # noqa: F821
        z = np.empty((n_tok, values.shape[0]), dtype=np.float32)
        _core_into(values, idx, h, z, n, m, bits)
        out = np.empty_like(z)
        _block_diag(a_blocks, z, out)  # noqa: F821
        return out

    UNPACK = _entry(_unpack_forward)
    SPARSE = _entry(_sparse_forward)
    SPARSE_BF16 = _entry(_sparse_forward_bf16)
    ARMOR = _entry(_armor_forward)

    # every cached dispatcher: the module's helpers, the drivers' twins and the entry points' serial builds (which
    # live in the tables above, not in the module's globals)
    _cached = [*globals().values(), *_SERIAL.values(), *_PARALLEL.values()]
    _serialise_cache_io({id(v): v for v in _cached if isinstance(v, numba.core.dispatcher.Dispatcher)}.values())


def _raw_numpy(t: Tensor):
    """A zero-copy numpy view of a float32 / bfloat16 / float16 tensor (16-bit floats as their raw bits)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.float32:
        return t.numpy()
    raise TypeError(f"the packed CPU kernels support float32, bfloat16 and float16, got {t.dtype}")


def _check_ready(*tensors: Tensor) -> None:
    if numba is None:
        raise RuntimeError("the packed CPU kernels need numba (pip install numba)")
    for t in tensors:
        if t.device.type != "cpu":
            raise RuntimeError(f"the packed CPU kernels run on CPU tensors, got one on {t.device}")


def _float32_rows(x: Tensor, width: int) -> Tensor:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"x must be (tokens, {width}), got {tuple(x.shape)}")
    x = x.detach()
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


@functools.cache
def _host_has_bf16_dot() -> bool:
    """Whether this CPU has the AVX512-BF16 dot-product instruction (``vdpbf16ps``)."""
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512bf16", False))


def _bf16_table(x: Tensor) -> Tensor:
    """The selection table of :func:`_selection_table` in bfloat16 for the first ``32 floor(kept / 32)`` kept
    entries of a bfloat16 ``x`` ``(T, in)`` (exact: the same bits, twice each)."""
    n_tok, width = x.shape
    k32 = width // 2 // 32 * 32
    groups = x[:, : 2 * k32].reshape(n_tok, k32 // 2, 4).transpose(1, 2)  # (T, 4, groups)
    return groups.repeat_interleave(2, dim=2).contiguous()


def _first_launch() -> None:
    """Pick numba's threading layer before its pool starts (see the module docstring); once per process."""
    global _launched
    _launched = True
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    try:
        numba.threading_layer()  # raises while no pool runs yet
    except ValueError:
        numba.config.THREADING_LAYER = "workqueue"


def _launch(kernel, work: int, *args):
    """Run ``kernel`` (a ``(serial, parallel)`` entry point) on torch's thread count when ``work`` (kept values x
    passes over them) reaches :data:`CPU_PARALLEL_MIN_WORK`, else serially, never touching numba's thread pool."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    parallel = threads > 1 and work >= CPU_PARALLEL_MIN_WORK
    with _LAUNCH_LOCK:
        if not _launched:
            _first_launch()
        if parallel:
            numba.set_num_threads(threads)
        return torch.from_numpy(kernel[parallel](*args))


def _work(values: Tensor, tokens: int = 4) -> int:
    """A call's work for :func:`_launch`: kept values x passes over them (the kernels take 4 tokens per pass)."""
    return values.numel() * -(-tokens // 4)


def nm_matmul(values: Tensor, indices: Tensor, x: Tensor, n: int, m: int) -> Tensor:
    """``x @ S^T`` for the packed n:m core ``S`` (``values`` ``(out, kept)``, ``indices`` uint8) and ``x``
    ``(T, in)`` (any float dtype, any strides): a new float32 ``(T, out)`` tensor.  No dense core is formed."""
    _check_ready(values, indices, x)
    if (n, m) == (2, 4) and values.dtype == x.dtype == torch.bfloat16 and _host_has_bf16_dot():
        if x.dim() != 2 or x.shape[1] != values.shape[1] * 2:
            raise ValueError(f"x must be (tokens, {values.shape[1] * 2}), got {tuple(x.shape)}")
        x = x.detach().contiguous()
        xs = _raw_numpy(_bf16_table(x))
        work = _work(values, x.shape[0])
        return _launch(SPARSE_BF16, work, _raw_numpy(values), indices.detach().numpy(), _raw_numpy(x), xs)
    x32 = _float32_rows(x, values.shape[1] // n * m)
    return _launch(
        SPARSE,
        _work(values, x32.shape[0]),
        _raw_numpy(values),
        indices.detach().numpy(),
        x32.numpy(),
        n,
        m,
        index_bits(m),
    )


def armor_matmul(
    b_blocks: Tensor, values: Tensor, indices: Tensor, a_blocks: Tensor, x: Tensor, n: int, m: int
) -> Tensor:
    """``x @ (A' S B')^T`` in one call: ``x`` ``(T, in)`` through the block diagonal ``B'``, the packed core and
    ``A'``, all summed in float32; a new float32 ``(T, out)`` tensor.  No dense matrix is formed."""
    _check_ready(b_blocks, values, indices, a_blocks, x)
    x32 = _float32_rows(x, b_blocks.shape[0] * b_blocks.shape[1])
    if a_blocks.shape[0] * a_blocks.shape[1] != values.shape[0]:
        raise ValueError(f"a_blocks {tuple(a_blocks.shape)} do not tile {values.shape[0]} output features")
    return _launch(
        ARMOR,
        _work(values, x32.shape[0]),
        _raw_numpy(b_blocks),
        _raw_numpy(values),
        indices.detach().numpy(),
        _raw_numpy(a_blocks),
        x32.numpy(),
        n,
        m,
        index_bits(m),
    )


def unpack_dense(values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    """The dense ``(out, in)`` core in ``values``' dtype, written in one pass over the packed state (what
    :func:`armor.runtime.packing.unpack_nm` returns, without its int64 index tensors: ~50x faster on CPU)."""
    _check_ready(values, indices)
    dense = _launch(UNPACK, _work(values), _raw_numpy(values), indices.detach().numpy(), n, m, index_bits(m))
    return dense.view(values.dtype) if values.dtype != torch.float32 else dense

