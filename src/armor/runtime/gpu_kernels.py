"""Triton kernels for the packed n:m format on CUDA (optional: used when ``triton`` imports and the tensors are
on a CUDA device; everything has a pure-PyTorch fallback in :mod:`armor.runtime.packing`).

:func:`unpack_dense_cuda` writes the dense ``(out, in)`` core from ``values`` / ``indices`` in one pass: each
program builds a tile of whole groups in registers (every kept value placed by comparing its 2-bit position
with the group's columns) and stores it once, coalesced.  The PyTorch fallback (``unpack_nm``) widens the
positions to int64 and scatters, several passes over tensors larger than the result; on an H100 it took
0.13 ms of kernels for a 4096x4096 fp16 core (benchmarks/RESULTS_runtime.md), the cost this kernel removes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .packing import index_bits

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the PyTorch unpack runs instead
    triton = tl = None

__all__ = ["triton_available", "unpack_dense_cuda"]

#: groups of m columns per program
_BLOCK_GROUPS = 256


def triton_available() -> bool:
    """Whether triton is installed (the kernels then run on CUDA tensors).  Cheap: called on every forward of
    the CUDA transient-dense path, whose tensors are already on a CUDA device."""
    return triton is not None


if triton is not None:

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


def unpack_dense_cuda(values: Tensor, packed_idx: Tensor, in_features: int, n: int = 2, m: int = 4) -> Tensor:
    """The dense ``(out, in_features)`` core in ``values``' dtype, on ``values``' CUDA device; the same result as
    :func:`armor.runtime.packing.unpack_nm` (which checks the shapes; call it for anything unusual)."""
    if triton is None:
        raise RuntimeError("unpack_dense_cuda needs triton (pip install triton)")
    if values.device.type != "cuda" or packed_idx.device != values.device:
        raise ValueError(f"unpack_dense_cuda needs CUDA tensors on one device, got {values.device}/{packed_idx.device}")
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
