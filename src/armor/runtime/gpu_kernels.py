"""Triton kernels that compute straight from the packed n:m format (optional: used when ``triton`` imports).

Three kernels, each one launch (a split core product adds one sum) with no host synchronisation, so a forward
made of them can be captured in a CUDA graph (the outputs are fresh ``torch.empty`` tensors, which a captured
graph takes from its private pool):

* :func:`nm_matmul_triton` -- ``y = x S^T (+ bias)`` for the packed core ``S``.  Each program owns a tile of
  output rows and walks the input, reading the tile's kept values and 2-bit (4-bit for m > 4) positions.  It
  either places every kept value in a register weight tile and multiplies that with the activations (``tl.dot``
  or a row sum), or skips the tile and multiplies each kept value by the activation at its position (half the
  multiplies and no register shuffles); :data:`EXPANDS` lists the forms, :data:`NM_TILES` picks one per token
  count.  The dense core is never written to memory: the bytes read are the packed state plus the activations.
* :func:`block_diag_matmul_triton` -- ``y = x D^T (+ bias)`` for a block-diagonal ``D`` stored as ``(k, b, b)``
  blocks of any size ``b`` (ARMOR's ragged / budgeted blocks): a batched small matmul over the blocks.
* :func:`armor_matmul_triton` -- ARMOR's ``A' (S (B' x))``: the three kernels above back to back on the device;
  the intermediates are ``(T, features)`` activations, never a weight-sized matrix, and no copy or transpose
  runs between them (every kernel takes its operands' strides).

Dot products: two operands of the same 16-bit dtype go to the tensor cores as they are; anything else (float32
modules, float32 intermediates) is multiplied in float32 (``input_precision="ieee"``: no TF32 rounding).

:func:`unpack_dense_cuda` (the transient-dense path for large batches) writes the dense core in one pass.

Every kernel also runs under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported) on CPU
tensors, which is how the test-suite checks them on machines without a GPU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .packing import index_bits

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the PyTorch paths run instead
    triton = tl = None

__all__ = [
    "triton_available",
    "nm_matmul_triton",
    "block_diag_matmul_triton",
    "armor_matmul_triton",
    "unpack_dense_cuda",
    "TRITON_DTYPES",
    "NMTile",
    "NM_TILES",
    "EXPANDS",
    "BDTile",
    "BD_TILES",
    "nm_tile",
]

#: groups of m columns per program of the unpack kernel
_BLOCK_GROUPS = 256
#: outputs per program of the split-sum kernel
_SUM_BLOCK = 1024
#: float32 products a one-token program may hold per thread across its loop (else it sums every step)
_DEFER_VALUES_PER_THREAD = 64
#: module dtypes the matmul kernels take
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """Whether triton is installed (the kernels then run on CUDA tensors).  Cheap: called on every forward of
    the CUDA paths, whose tensors are already on a CUDA device."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _dot(a, b, NATIVE: tl.constexpr):
        """``a @ b`` summed in float32: on the tensor cores for two 16-bit operands, else exactly in float32."""
        if NATIVE:
            return tl.dot(a, b)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _within(i, limit, EVEN: tl.constexpr):
        """``i < limit``, or a constant all-true mask when the launch knows every tile is whole (EVEN): the
        compiler then drops the predicates and the zero fills of masked loads."""
        if EVEN:
            ok = tl.full(i.shape, 1, tl.int1)
        else:
            ok = i < limit
        return ok

    @triton.jit
    def _tile_gather(
        values_ptr, idx_ptr, rows64, row_ok, cols, col_ok, svo, svk, sio, sik,
        N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """The dense weight tile (rows, cols) of any n:m pattern: each dense column looks up its group's kept
        entries (value and position) and keeps the one whose position is its own."""
        per_byte: tl.constexpr = 8 // BITS
        ok = row_ok[:, None] & col_ok[None, :]
        own = (cols % M)[None, :]
        w = tl.zeros((BLOCK_O, BLOCK_K), dtype=values_ptr.dtype.element_ty)
        for j in tl.static_range(N):
            k = (cols // M) * N + j  # the j-th kept entry of each column's group
            v = tl.load(values_ptr + rows64[:, None] * svo + k[None, :] * svk, mask=ok, other=0.0)
            byte = tl.load(idx_ptr + rows64[:, None] * sio + (k // per_byte)[None, :] * sik, mask=ok, other=0)
            pos = (byte.to(tl.int32) >> ((k % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)
            w = tl.where(pos == own, v, w)
        return w

    @triton.jit
    def _tile_24(
        values_ptr, idx_ptr, rows64, row_ok, c0, in_features, svo, svk, sio, sik,
        EVEN: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """The dense weight tile (rows, BLOCK_K columns from c0) of a 2:4 core from contiguous loads: the
        tile's kept values (2 per group) and one index byte per two groups, spread to the four columns of each
        group in registers (join / reshape)."""
        G: tl.constexpr = BLOCK_K // 4
        g = c0 // 4 + tl.arange(0, G)
        kk = c0 // 2 + tl.arange(0, 2 * G)
        v = tl.load(
            values_ptr + rows64[:, None] * svo + kk[None, :] * svk,
            mask=row_ok[:, None] & _within(kk, in_features // 2, EVEN)[None, :],
            other=0.0,
        )
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_O, G, 2)))
        byte = tl.load(
            idx_ptr + rows64[:, None] * sio + (g // 2)[None, :] * sik,
            mask=row_ok[:, None] & _within(g, in_features // 4, EVEN)[None, :],
            other=0,
        ).to(tl.int32)
        shift = ((g % 2) * 4)[None, :]  # 2 bits per kept entry, 4 per byte: a byte holds two groups
        p0 = (byte >> shift) & 3
        p1 = (byte >> (shift + 2)) & 3
        zero = tl.zeros_like(v0)
        d0 = tl.where(p0 == 0, v0, tl.where(p1 == 0, v1, zero))
        d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
        d3 = tl.where(p0 == 3, v0, tl.where(p1 == 3, v1, zero))
        # [g, i, j] = d(2i + j): row-major flattening puts the four columns of a group in order
        return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_O, BLOCK_K))

    @triton.jit
    def _kept_x_24(
        x_row, values_ptr, idx_ptr, rows64, row_ok, k0, kept, sxk, svo, svk, sio, sik,
        EVEN: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """``(rows, BLOCK_K // 2)`` products of a 2:4 core's kept entries ``k0 .. k0 + BLOCK_K`` with one token's
        activations (``x_row``): per group, each of its two kept values times the activation its 2-bit
        position selects from the group's four (no weight tile).  Summed over groups by the caller."""
        G: tl.constexpr = BLOCK_K // 2
        g = k0 // 2 + tl.arange(0, G)
        g_ok = _within(g, kept // 2, EVEN)
        kk = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(
            values_ptr + rows64[:, None] * svo + kk[None, :] * svk,
            mask=row_ok[:, None] & _within(kk, kept, EVEN)[None, :],
            other=0.0,
        )
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_O, G, 2)))  # contiguous loads, the pair split in registers
        byte = tl.load(
            idx_ptr + rows64[:, None] * sio + (g // 2)[None, :] * sik, mask=row_ok[:, None] & g_ok[None, :], other=0
        ).to(tl.int32)
        shift = ((g % 2) * 4)[None, :]  # 2 bits per kept entry, 4 per byte: a byte holds two groups
        p0 = (byte >> shift) & 3
        p1 = (byte >> (shift + 2)) & 3
        xs = x_row + (4 * g) * sxk
        x0 = tl.load(xs, mask=g_ok, other=0.0).to(tl.float32)[None, :]
        x1 = tl.load(xs + sxk, mask=g_ok, other=0.0).to(tl.float32)[None, :]
        x2 = tl.load(xs + 2 * sxk, mask=g_ok, other=0.0).to(tl.float32)[None, :]
        x3 = tl.load(xs + 3 * sxk, mask=g_ok, other=0.0).to(tl.float32)[None, :]
        s0 = tl.where(p0 == 0, x0, tl.where(p0 == 1, x1, tl.where(p0 == 2, x2, x3)))
        s1 = tl.where(p1 == 0, x0, tl.where(p1 == 1, x1, tl.where(p1 == 2, x2, x3)))
        return v0.to(tl.float32) * s0 + v1.to(tl.float32) * s1

    @triton.jit
    def _kept_x_gather(
        x_row, values_ptr, idx_ptr, rows64, row_ok, k0, kept, sxk, svo, svk, sio, sik,
        N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, EVEN: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """As :func:`_kept_x_24` for any n:m, ``(rows, index bytes)``: each kept entry loads the activation at
        its own column; the products of one index byte's entries come summed."""
        # kept entries as (rows, index bytes, entries per byte): each index byte is loaded once
        per_byte: tl.constexpr = 8 // BITS
        KB: tl.constexpr = BLOCK_K // per_byte
        kb = k0 // per_byte + tl.arange(0, KB)
        j = tl.arange(0, per_byte)
        k = kb[:, None] * per_byte + j[None, :]  # (KB, per_byte) kept-entry index
        ok = row_ok[:, None, None] & _within(k, kept, EVEN)[None, :, :]
        v = tl.load(values_ptr + rows64[:, None, None] * svo + k[None, :, :] * svk, mask=ok, other=0.0)
        byte_ok = row_ok[:, None] & _within(kb, tl.cdiv(kept, per_byte), EVEN)[None, :]
        byte = tl.load(idx_ptr + rows64[:, None] * sio + kb[None, :] * sik, mask=byte_ok, other=0)
        pos = (byte.to(tl.int32)[:, :, None] >> (j * BITS)[None, None, :]) & ((1 << BITS) - 1)
        col = ((k // N) * M)[None, :, :] + pos
        prod = tl.load(x_row + col * sxk, mask=ok, other=0.0).to(tl.float32) * v.to(tl.float32)
        return tl.sum(prod, axis=2)  # (rows, index bytes): a byte's entries sit in one thread, no shuffle

    @triton.jit
    def _weight_tile(
        values_ptr, idx_ptr, rows64, row_ok, c0, in_features, svo, svk, sio, sik,
        N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, EXPAND: tl.constexpr, EVEN: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """The dense (rows, BLOCK_K columns from c0) weight tile: joined 2:4 (EXPAND 0) or gathered (1)."""
        if EXPAND == 0:
            w = _tile_24(values_ptr, idx_ptr, rows64, row_ok, c0, in_features, svo, svk, sio, sik,
                         EVEN, BLOCK_O, BLOCK_K)  # fmt: skip
        else:
            cols = c0 + tl.arange(0, BLOCK_K)
            w = _tile_gather(values_ptr, idx_ptr, rows64, row_ok, cols, _within(cols, in_features, EVEN),
                             svo, svk, sio, sik, N, M, BITS, BLOCK_O, BLOCK_K)  # fmt: skip
        return w

    @triton.jit
    def _one_token_products(
        x_row, values_ptr, idx_ptr, rows64, row_ok, c0, in_features, kept, sxk, svo, svk, sio, sik,
        N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, EXPAND: tl.constexpr, EVEN: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One loop step's (rows, units) float32 products with one token's activations, to be summed over
        units: kept entries times selected / gathered activations (EXPAND 2, 3), or a weight tile times the
        activations (0, 1)."""
        if EXPAND == 2:
            out = _kept_x_24(x_row, values_ptr, idx_ptr, rows64, row_ok, c0, kept, sxk, svo, svk, sio, sik,
                             EVEN, BLOCK_O, BLOCK_K)  # fmt: skip
        elif EXPAND == 3:
            out = _kept_x_gather(x_row, values_ptr, idx_ptr, rows64, row_ok, c0, kept, sxk, svo, svk, sio, sik,
                                 N, M, BITS, EVEN, BLOCK_K)  # fmt: skip
        else:
            w = _weight_tile(values_ptr, idx_ptr, rows64, row_ok, c0, in_features, svo, svk, sio, sik,
                             N, M, BITS, EXPAND, EVEN, BLOCK_O, BLOCK_K)  # fmt: skip
            cols = c0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_row + cols * sxk, mask=_within(cols, in_features, EVEN), other=0.0)
            out = xt.to(tl.float32)[None, :] * w.to(tl.float32)
        return out

    @triton.jit
    def _nm_matmul_kernel(
        x_ptr, values_ptr, idx_ptr, bias_ptr, out_ptr,
        n_tok, out_features, in_features, kept,
        sxt, sxk, svo, svk, sio, sik, sos, sot, soo,
        N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE: tl.constexpr,
        EXPAND: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, DEFER: tl.constexpr, UNITS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = _within(rows, out_features, EVEN)
        tok_ok = toks < n_tok
        rows64, toks64 = rows.to(tl.int64), toks.to(tl.int64)
        # the loop walks kept entries (activation-select forms) or dense columns (weight-tile forms); program
        # ``split`` of SPLIT takes one contiguous share of its steps
        width = kept if EXPAND >= 2 else in_features
        share = tl.cdiv(tl.cdiv(width, BLOCK_K), SPLIT) * BLOCK_K
        lo = tl.program_id(2) * share
        hi = tl.minimum(lo + share, width)
        if BLOCK_T == 1 and DEFER:
            # one token: elementwise products accumulate across the steps and are summed across lanes once at
            # the end (a sum per step costs a shuffle tree per step)
            x_row = x_ptr + tl.program_id(1).to(tl.int64) * sxt
            part = tl.zeros((BLOCK_O, UNITS), dtype=tl.float32)
            for c0 in range(lo, hi, BLOCK_K):
                part += _one_token_products(x_row, values_ptr, idx_ptr, rows64, row_ok, c0, in_features, kept, sxk,
                                            svo, svk, sio, sik, N, M, BITS, EXPAND, EVEN, BLOCK_O, BLOCK_K)  # fmt: skip
            acc = tl.sum(part, axis=1)[None, :]
        elif BLOCK_T == 1:  # one token, a step too wide to keep its products in registers: summed per step
            x_row = x_ptr + tl.program_id(1).to(tl.int64) * sxt
            acc = tl.zeros((1, BLOCK_O), dtype=tl.float32)
            for c0 in range(lo, hi, BLOCK_K):
                acc += tl.sum(_one_token_products(x_row, values_ptr, idx_ptr, rows64, row_ok, c0, in_features, kept,
                                                  sxk, svo, svk, sio, sik, N, M, BITS, EXPAND, EVEN, BLOCK_O, BLOCK_K),
                              axis=1)[None, :]  # fmt: skip
        else:  # tensor cores (or exact float32) on (tokens, columns) x (columns, rows) weight tiles
            acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
            for c0 in range(lo, hi, BLOCK_K):
                w = _weight_tile(values_ptr, idx_ptr, rows64, row_ok, c0, in_features, svo, svk, sio, sik,
                                 N, M, BITS, EXPAND, EVEN, BLOCK_O, BLOCK_K)  # fmt: skip
                cols = c0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + toks64[:, None] * sxt + cols[None, :] * sxk,
                             mask=tok_ok[:, None] & (cols < in_features)[None, :], other=0.0)  # fmt: skip
                acc += _dot(xt, tl.trans(w), NATIVE)
        if HAS_BIAS:  # (a split launch adds it after summing its shares)
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + tl.program_id(2).to(tl.int64) * sos + toks64[:, None] * sot + rows64[None, :] * soo
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & row_ok[None, :])

    @triton.jit
    def _split_sum_kernel(
        parts_ptr, bias_ptr, out_ptr, n, rows, sps,
        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """``out = sum over the SPLIT float32 shares (+ bias)`` for ``n`` contiguous outputs (tokens x rows),
        cast to the output dtype: one launch after a split core product."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            acc += tl.load(parts_ptr + j * sps + i, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + i % rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _block_diag_kernel(
        x_ptr, blocks_ptr, bias_ptr, out_ptr,
        n_tok, size,
        sxt, sxk, sbq, sbi, sbj, sot, soo,
        HAS_BIAS: tl.constexpr, NATIVE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    ):  # fmt: skip
        q = tl.program_id(0)
        ii = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        toks = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        i_ok = ii < size
        tok_ok = toks < n_tok
        base = q.to(tl.int64) * size
        acc = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
        for j0 in range(0, size, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            j_ok = jj < size
            xt = tl.load(
                x_ptr + toks[:, None].to(tl.int64) * sxt + (base + jj)[None, :] * sxk,
                mask=tok_ok[:, None] & j_ok[None, :],
                other=0.0,
            )
            bt = tl.load(  # (j, i): the block transposed by its strides, no copy
                blocks_ptr + q.to(tl.int64) * sbq + ii[None, :] * sbi + jj[:, None] * sbj,
                mask=i_ok[None, :] & j_ok[:, None],
                other=0.0,
            )
            acc += _dot(xt, bt, NATIVE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + base + ii, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + toks[:, None].to(tl.int64) * sot + (base + ii)[None, :] * soo
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & i_ok[None, :])

    @triton.jit
    def _unpack_kernel(
        values_ptr,
        indices_ptr,
        out_ptr,
        kept_per_row,
        bytes_per_row,
        n_groups,
        N: tl.constexpr,
        M: tl.constexpr,
        M_POW2: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK_GROUPS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        groups = tl.program_id(1) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
        in_range = groups < n_groups
        cols = tl.arange(0, M_POW2)
        per_byte: tl.constexpr = 8 // BITS
        tile = tl.zeros((BLOCK_GROUPS, M_POW2), dtype=tl.float32)
        for j in tl.static_range(N):
            k = groups * N + j  # the j-th kept entry of each group
            value = tl.load(values_ptr + row * kept_per_row + k, mask=in_range, other=0.0).to(tl.float32)
            byte = tl.load(indices_ptr + row * bytes_per_row + k // per_byte, mask=in_range, other=0).to(tl.int32)
            position = (byte >> ((k % per_byte) * BITS)) & ((1 << BITS) - 1)
            # exact: each column receives one kept value or zeros
            tile += tl.where(position[:, None] == cols[None, :], value[:, None], 0.0)
        offsets = row * (n_groups * M) + groups[:, None] * M + cols[None, :]
        store_mask = in_range[:, None] & (cols[None, :] < M)
        tl.store(out_ptr + offsets, tile.to(out_ptr.dtype.element_ty), mask=store_mask)


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need triton (pip install triton, or armor-prune[gpu])")


def _interpreting() -> bool:
    return bool(getattr(getattr(triton, "knobs", None), "runtime", None) and triton.knobs.runtime.interpret)


def _native_dot(a: torch.dtype, b: torch.dtype) -> bool:
    """Tensor-core dot for two operands of one 16-bit dtype.  Triton's interpreter multiplies bfloat16 dot
    operands as raw bits, so under it bfloat16 is multiplied in float32 (the products are exact either way)."""
    if a != b or a not in (torch.float16, torch.bfloat16):
        return False
    return not (a == torch.bfloat16 and _interpreting())


class NMTile(NamedTuple):
    """One program's work in :func:`nm_matmul_triton`: ``rows`` output rows, ``columns`` input units per step
    (dense columns when a weight tile is built, kept entries when activations are selected), the launch's
    ``warps`` and software-pipelining ``stages``, how the packed core meets the activations (``expand``, one of
    :data:`EXPANDS`), and ``split``: programs that share each row tile's input, their float32 partial sums added
    by a second step (more programs in flight for layers with few row tiles)."""

    rows: int
    columns: int
    warps: int = 4
    stages: int = 3
    expand: str = "join"
    split: int = 1


#: the ways :func:`nm_matmul_triton` combines the packed core with the activations:
#:
#: * ``join`` -- a (rows, columns) weight tile expanded from contiguous 2:4 loads (``tl.join``), then a dot or
#:   a row sum; 2:4 up to 16 token rows (Triton 3.6 cannot lay out the joined tile for a 64-row tensor-core dot
#:   on Hopper), else ``gather``;
#: * ``gather`` -- a weight tile whose every column gathers its group's kept entries (any n:m);
#: * ``xselect`` -- one token: no weight tile, each kept value times the activation its position selects from
#:   its group's four, half the multiplies of a dense tile (2:4; else ``xgather``; token tiles: ``join``);
#: * ``xgather`` -- one token: no weight tile, each kept value times the activation loaded at its own column
#:   (any n:m; token tiles: ``gather``).
EXPANDS = ("join", "gather", "xselect", "xgather")


def _expand_code(tile: NMTile, n: int, m: int, block_t: int) -> int:
    """The kernel's EXPAND constant for ``tile`` on an n:m core (0-3 as in :data:`EXPANDS`), falling back to
    the form that applies: the 2:4 forms become their any-n:m forms on other patterns, and the activation
    forms (one token) their weight-tile forms on token tiles."""
    if tile.expand not in EXPANDS:
        raise ValueError(f"{tile}: expand must be one of {', '.join(EXPANDS)}")
    if tile.split < 1 or tile.columns < 2 or tile.columns & (tile.columns - 1):
        raise ValueError(f"{tile}: columns must be a power of two >= 2 and split >= 1")
    if tile.expand == "join" and tile.columns % 8:
        raise ValueError(f"{tile}: the 2:4 expansion takes whole index bytes, a multiple of 8 columns")
    two_four = (n, m) == (2, 4)
    if block_t == 1 and tile.expand in ("xselect", "xgather"):
        if tile.columns < 8:
            raise ValueError(f"{tile}: the activation forms take 8 kept entries per step at least (2 index bytes)")
        return 2 if two_four and tile.expand == "xselect" else 3
    if tile.expand in ("join", "xselect") and two_four and block_t <= 16 and tile.columns % 8 == 0:
        return 0
    return 1


#: the tiling per token tile (:func:`_token_tile`: 1 for one token, else 16, 32 or 64 token rows per program);
#: the largest key not above the call's token tile is used.  The best of ``python benchmarks/gpu_tune.py`` on an
#: H200, float16 (benchmarks/gpu_tune_h200.md).
NM_TILES: dict[int, NMTile] = {
    1: NMTile(16, 512, 2, 2, "join"),
    16: NMTile(16, 512, 2, 4, "join"),
    64: NMTile(16, 128, 4, 2, "gather"),
}


class BDTile(NamedTuple):
    """One program's work in :func:`block_diag_matmul_triton`: ``rows`` output features of one block,
    ``columns`` of its input features per step (both capped at the block size), and the launch's ``warps``."""

    rows: int
    columns: int
    warps: int = 4


#: the block-diagonal tiling per token tile (16, 32 or 64 token rows per program), as :data:`NM_TILES` (the
#: same sweep)
BD_TILES: dict[int, BDTile] = {16: BDTile(16, 128, 4), 64: BDTile(64, 128, 4)}


def _tile_for(table: dict[int, Any], block_t: int) -> Any:
    """A tiling table's entry for a token tile of ``block_t`` rows: the largest key not above it."""
    return table[max(t for t in table if t <= block_t)]


def nm_tile(block_t: int) -> NMTile:
    """The :data:`NM_TILES` entry for a token tile of ``block_t`` rows."""
    return _tile_for(NM_TILES, block_t)


def _token_tile(n_tok: int, dot_only: bool = False) -> int:
    """Token rows per program: 1 for a single token (a row-sum kernel) unless ``dot_only``; else 16 to 64, as
    tl.dot needs at least 16 and 64 keeps one tile for decoding-sized batches."""
    if n_tok == 1 and not dot_only:
        return 1
    return min(64, max(16, triton.next_power_of_2(max(n_tok, 1))))


def _check_rows(x: Tensor, width: int, *state: Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"x must be (tokens, {width}), got {tuple(x.shape)}")
    if any(t.device != x.device for t in state):
        raise ValueError(f"the packed state and x must be on one device, x is on {x.device}")


def nm_kernel_constants(
    tile: NMTile, n: int, m: int, block_t: int, out_features: int, in_features: int
) -> dict[str, Any]:
    """The compile-time constants of the n:m kernel for ``tile`` on an ``out_features x in_features`` n:m core
    at a token tile of ``block_t`` (all but HAS_BIAS and NATIVE, which depend on the call's tensors)."""
    expand = _expand_code(tile, n, m, block_t)
    kept = in_features // m * n
    width = kept if expand >= 2 else in_features  # what one loop step walks: kept entries or dense columns
    # columns of one one-token step's products per row: groups (xselect), index bytes (xgather), dense columns
    units = {2: tile.columns // 2, 3: tile.columns * index_bits(m) // 8}.get(expand, tile.columns)
    return {
        "N": n, "M": m, "BITS": index_bits(m), "EXPAND": expand, "SPLIT": tile.split, "UNITS": units,
        # whole row tiles and whole steps (the 7B shapes): the one-token loads need no bounds masks
        "EVEN": block_t == 1 and out_features % tile.rows == 0 and width % tile.columns == 0,
        # one token: a step's products stay in registers across the loop while they need <= 64 per thread
        "DEFER": tile.rows * units <= _DEFER_VALUES_PER_THREAD * 32 * tile.warps,
        "BLOCK_T": block_t, "BLOCK_O": tile.rows, "BLOCK_K": tile.columns,
    }  # fmt: skip


def nm_matmul_triton(
    values: Tensor, indices: Tensor, x: Tensor, n: int, m: int, bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None, tile: NMTile | None = None,
) -> Tensor:  # fmt: skip
    """``x @ S^T + bias`` for the packed n:m core ``S`` (``values`` ``(out, kept)``, ``indices`` uint8) and ``x``
    ``(T, in)`` of any strides: a new ``(T, out)`` tensor in ``out_dtype`` (default: ``values``' dtype), summed
    in float32.  No dense core is formed.  ``tile`` overrides the tiling of :data:`NM_TILES` (for tuning)."""
    _need_triton()
    out_features, kept = values.shape
    n_groups = kept // n
    _check_rows(x, n_groups * m, values, indices)
    dtype = out_dtype or values.dtype
    block_t = _token_tile(x.shape[0])
    tile = nm_tile(block_t) if tile is None else tile
    consts = nm_kernel_constants(tile, n, m, block_t, out_features, n_groups * m)
    split = tile.split
    if split > 1:  # float32 shares, summed (and the bias added) below: still no host synchronisation
        out = torch.empty(split, x.shape[0], out_features, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(1, x.shape[0], out_features, dtype=dtype, device=x.device)
    grid = (triton.cdiv(out_features, tile.rows), triton.cdiv(x.shape[0], block_t), split)
    _nm_matmul_kernel[grid](
        x, values, indices, values if bias is None or split > 1 else bias, out,
        x.shape[0], out_features, n_groups * m, kept,
        x.stride(0), x.stride(1), values.stride(0), values.stride(1), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_BIAS=bias is not None and split == 1, NATIVE=_native_dot(x.dtype, values.dtype), **consts,
        num_warps=tile.warps, num_stages=tile.stages,
    )  # fmt: skip
    if split == 1:
        return out[0]
    y = torch.empty(x.shape[0], out_features, dtype=dtype, device=x.device)
    total = y.numel()
    _split_sum_kernel[(triton.cdiv(total, _SUM_BLOCK),)](
        out, out if bias is None else bias, y, total, out_features, out.stride(0),
        HAS_BIAS=bias is not None, SPLIT=split, BLOCK=_SUM_BLOCK,
    )  # fmt: skip
    return y


def block_diag_matmul_triton(
    blocks: Tensor, x: Tensor, bias: Tensor | None = None, out_dtype: torch.dtype | None = None,
    tile: BDTile | None = None,
) -> Tensor:  # fmt: skip
    """``x`` ``(T, k*b)`` times the transposed block diagonal of ``blocks`` ``(k, b, b)`` (block ``q`` of a row
    becomes ``x_q B_q^T``), plus ``bias``: a new ``(T, k*b)`` tensor in ``out_dtype`` (default: ``blocks``'
    dtype), summed in float32.  Any ``b``; any strides of ``x`` and ``blocks``.  ``tile`` overrides
    :data:`BD_TILES` (for tuning)."""
    _need_triton()
    k, size, _ = blocks.shape
    _check_rows(x, k * size, blocks)
    out = torch.empty(x.shape[0], k * size, dtype=out_dtype or blocks.dtype, device=x.device)
    block_t = _token_tile(x.shape[0], dot_only=True)
    tile = _tile_for(BD_TILES, block_t) if tile is None else tile
    fit = max(16, triton.next_power_of_2(size))  # no wider than the block (tl.dot takes 16 at least)
    block_i, block_j = min(tile.rows, fit), min(tile.columns, fit)
    grid = (k, triton.cdiv(size, block_i), triton.cdiv(x.shape[0], block_t))
    _block_diag_kernel[grid](
        x, blocks, blocks if bias is None else bias, out,
        x.shape[0], size,
        x.stride(0), x.stride(1), blocks.stride(0), blocks.stride(1), blocks.stride(2), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, NATIVE=_native_dot(x.dtype, blocks.dtype),
        BLOCK_T=block_t, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=tile.warps,
    )  # fmt: skip
    return out


def armor_matmul_triton(
    b_blocks: Tensor, values: Tensor, indices: Tensor, a_blocks: Tensor, x: Tensor, n: int, m: int,
    bias: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """ARMOR's ``x @ (A' S B')^T + bias`` for ``x`` ``(T, in)``: ``B'``, the packed core, then ``A'`` and the bias,
    three launches on the device.  ``B' x`` is kept in the module dtype for token tiles (so a 16-bit core runs
    on the tensor cores, the rounding the dense path also makes) and in float32 for one token (the one-token
    kernel multiplies in float32 anyway: no conversion per kept weight); the core's output stays float32 until
    ``A'``.  Returns a new ``(T, out)`` tensor in ``values``' dtype."""
    if a_blocks.shape[0] * a_blocks.shape[1] != values.shape[0]:
        raise ValueError(f"a_blocks {tuple(a_blocks.shape)} do not tile {values.shape[0]} output features")
    h = block_diag_matmul_triton(b_blocks, x, out_dtype=torch.float32 if x.shape[0] == 1 else values.dtype)
    z = nm_matmul_triton(values, indices, h, n, m, out_dtype=torch.float32)
    return block_diag_matmul_triton(a_blocks, z, bias, out_dtype=values.dtype)


def unpack_dense_cuda(values: Tensor, packed_idx: Tensor, in_features: int, n: int = 2, m: int = 4) -> Tensor:
    """The dense ``(out, in_features)`` core in ``values``' dtype, on ``values``' device; the same result as
    :func:`armor.runtime.packing.unpack_nm` (which checks the shapes; call it for anything unusual)."""
    _need_triton()
    if packed_idx.device != values.device:
        raise ValueError(f"unpack_dense_cuda needs tensors on one device, got {values.device}/{packed_idx.device}")
    out_features, kept = values.shape
    n_groups = in_features // m
    if kept != n_groups * n or packed_idx.dtype != torch.uint8 or packed_idx.shape[0] != out_features:
        raise ValueError(
            f"values {tuple(values.shape)} / indices {tuple(packed_idx.shape)} {packed_idx.dtype} do not match "
            f"a {out_features}x{in_features} core at {n}:{m}"
        )
    values, packed_idx = values.contiguous(), packed_idx.contiguous()
    out = torch.empty(out_features, in_features, dtype=values.dtype, device=values.device)
    grid = (out_features, triton.cdiv(n_groups, _BLOCK_GROUPS))
    _unpack_kernel[grid](
        values,
        packed_idx,
        out,
        kept,
        packed_idx.shape[1],
        n_groups,
        N=n,
        M=m,
        M_POW2=triton.next_power_of_2(m),
        BITS=index_bits(m),
        BLOCK_GROUPS=_BLOCK_GROUPS,
    )
    return out
