"""Compact storage of an n:m sparse core: kept values plus bit-packed in-group positions.

A ``(out, in)`` core with an n:m mask along the input dimension is stored as

* ``values`` ``(out, in * n / m)``: the kept entries of each group of ``m``, in increasing column order, in
  the core's dtype (zeros at kept positions are stored as zeros, so the round trip is exact);
* ``packed_idx`` ``(out, ceil(in * n / m / per_byte))`` uint8: the position ``0..m-1`` of each kept entry
  inside its group, ``bits`` bits each, ``per_byte = 8 // bits`` of them per byte, first entry in the lowest
  bits.

``bits`` is 1 for m = 2, 2 for m = 4 (2:4: one byte holds the positions of two groups) and 4 for m <= 16
(4:8 and friends).  Rows are packed independently so a row slice of the packed tensors is a row slice of the
core (useful for sharding by output features).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["index_bits", "packed_index_shape", "pack_nm", "unpack_nm", "unpack_indices", "unpack_mask",
           "check_positions"]


def index_bits(m: int) -> int:
    """Bits stored per kept entry for a group size ``m`` (a divisor of 8 so entries never straddle bytes)."""
    if m < 2 or m > 16:
        raise ValueError(f"group size m must be in 2..16 for packed storage, got {m}")
    for bits in (1, 2, 4):
        if (1 << bits) >= m:
            return bits
    raise AssertionError("unreachable")  # pragma: no cover


def _check_pattern(n: int, m: int) -> None:
    if not (0 < n < m):
        raise ValueError(f"an n:m pattern needs 0 < n < m, got {n}:{m}")
    index_bits(m)


def packed_index_shape(out_features: int, in_features: int, n: int = 2, m: int = 4) -> tuple[int, int]:
    """Shape of the uint8 index tensor :func:`pack_nm` returns for a ``(out, in)`` core."""
    _check_pattern(n, m)
    if in_features % m:
        raise ValueError(f"in_features={in_features} is not a multiple of m={m}")
    per_byte = 8 // index_bits(m)
    kept = in_features // m * n
    return out_features, -(-kept // per_byte)


def pack_nm(core: Tensor, mask: Tensor, n: int = 2, m: int = 4) -> tuple[Tensor, Tensor]:
    """Pack a masked ``(out, in)`` core into ``(values, packed_idx)``; see the module docstring.

    ``values`` keeps ``core``'s dtype and device.  Raises a ValueError when ``mask`` does not have exactly
    ``n`` kept entries in every group of ``m`` consecutive input columns (the message names the first bad
    row and group).
    """
    _check_pattern(n, m)
    if core.dim() != 2 or mask.shape != core.shape:
        raise ValueError(
            f"core and mask must be 2-D of the same shape, got {tuple(core.shape)} and {tuple(mask.shape)}"
        )
    out_f, in_f = core.shape
    if in_f % m:
        raise ValueError(f"in_features={in_f} is not a multiple of m={m}, cannot hold a {n}:{m} pattern")
    # uint8 arithmetic throughout: several times faster than bool/int64 on CPU for 7B-sized layers.
    groups = mask.to(torch.bool).reshape(out_f, in_f // m, m).view(torch.uint8)
    counts = groups.sum(-1, dtype=torch.uint8)
    bad = counts != n
    if bool(bad.any()):
        row, grp = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"mask is not {n}:{m}: row {row}, columns {grp * m}..{grp * m + m - 1} keep "
            f"{int(counts[row, grp])} entries instead of {n} ({int(bad.sum())} bad groups in all)"
        )
    # The running count of kept entries is nondecreasing along a group, so the position of the (j+1)-th kept
    # entry is the number of positions whose running count is still <= j.
    running = groups.cumsum(-1, dtype=torch.uint8)
    order = torch.stack([(running <= j).sum(-1, dtype=torch.uint8) for j in range(n)], dim=-1)
    values = torch.gather(core.reshape(out_f, in_f // m, m), -1, order.long()).reshape(out_f, -1).contiguous()
    return values, _pack_indices(order.reshape(out_f, -1), index_bits(m))


def _pack_indices(idx: Tensor, bits: int) -> Tensor:
    rows, kept = idx.shape
    per_byte = 8 // bits
    pad = (-kept) % per_byte
    idx = idx.to(torch.uint8)
    if pad:
        idx = torch.cat([idx, idx.new_zeros(rows, pad)], dim=1)
    idx = idx.reshape(rows, -1, per_byte)
    packed = idx[..., 0].clone()
    for j in range(1, per_byte):
        packed |= idx[..., j] << (j * bits)
    return packed


def unpack_indices(packed_idx: Tensor, kept_per_row: int, m: int) -> Tensor:
    """The in-group positions ``(out, kept_per_row)`` (int64) stored in ``packed_idx``."""
    bits = _checked_bits(packed_idx, kept_per_row, m)
    return _fields(packed_idx, kept_per_row, bits).long()


def _checked_bits(packed_idx: Tensor, kept_per_row: int, m: int) -> int:
    """Bits per stored position, once ``packed_idx`` is uint8 with the bytes per row ``kept_per_row`` needs."""
    bits = index_bits(m)
    per_byte = 8 // bits
    nbytes = packed_idx.shape[1]
    if packed_idx.dtype != torch.uint8:
        raise ValueError(f"packed indices must be uint8, got {packed_idx.dtype}")
    if nbytes != -(-kept_per_row // per_byte):
        raise ValueError(
            f"packed indices have {nbytes} bytes per row, expected {-(-kept_per_row // per_byte)} "
            f"for {kept_per_row} kept entries at {bits} bits each"
        )
    return bits


def _fields(packed_idx: Tensor, kept_per_row: int, bits: int) -> Tensor:
    """The stored positions of ``packed_idx`` as uint8, ``(rows, kept_per_row)``."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed_idx.device)
    fields = (packed_idx.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed_idx.shape[0], packed_idx.shape[1] * (8 // bits))[:, :kept_per_row]


def check_positions(packed_idx: Tensor, kept_per_row: int, n: int, m: int) -> None:
    """A ValueError naming the first group of ``packed_idx`` whose ``n`` positions are not strictly increasing and
    below ``m``, as :func:`pack_nm` writes them.  A repeated position would make the packed kernels add two
    values into one column where the dense reconstruction keeps one, so outputs would depend on the path."""
    bits, rows = _checked_bits(packed_idx, kept_per_row, m), packed_idx.shape[0]
    step = max(1, (1 << 22) // max(kept_per_row, 1))  # about 4M positions at a time
    for start in range(0, rows, step):
        bad = _bad_groups(packed_idx[start:start + step], kept_per_row, n, m, bits)
        if bool(bad.any()):
            row, grp = (int(v) for v in bad.nonzero()[0])
            pos = _fields(packed_idx[start + row:start + row + 1], kept_per_row, bits)[0, grp * n:(grp + 1) * n]
            raise ValueError(
                f"row {start + row}, columns {grp * m}..{grp * m + m - 1}: stored positions {pos.tolist()} are "
                f"not {n} distinct increasing positions below {m}"
            )


def _bad_groups(packed_idx: Tensor, kept_per_row: int, n: int, m: int, bits: int) -> Tensor:
    """``(rows, groups)``: whether each group's positions are out of order, repeated or not below ``m``."""
    per_byte, field = 8 // bits, (1 << bits) - 1
    if per_byte % n:  # a group spans bytes: compare the unpacked positions
        groups = _fields(packed_idx, kept_per_row, bits).reshape(packed_idx.shape[0], -1, n)
        return (groups[..., 1:] <= groups[..., :-1]).any(-1) | (groups[..., -1] >= m)
    # Each byte holds whole groups: compare its fields in place (for 2:4, two nibbles of two positions each).
    fields = [(packed_idx >> (k * bits)) & field for k in range(per_byte)]
    bad = []
    for g in range(per_byte // n):
        f = fields[g * n:(g + 1) * n]
        b = f[-1] >= m
        for lo, hi in zip(f[:-1], f[1:], strict=True):
            b |= hi <= lo
        bad.append(b)
    return torch.stack(bad, dim=-1).reshape(packed_idx.shape[0], -1)[:, :kept_per_row // n]


def unpack_nm(values: Tensor, packed_idx: Tensor, in_features: int, n: int = 2, m: int = 4) -> Tensor:
    """The dense ``(out, in_features)`` core (zeros off the mask), values' dtype; inverts :func:`pack_nm`."""
    _check_pattern(n, m)
    if in_features % m:
        raise ValueError(f"in_features={in_features} is not a multiple of m={m}")
    out_f = values.shape[0]
    kept = in_features // m * n
    if values.dim() != 2 or values.shape[1] != kept:
        raise ValueError(
            f"values must be (out, {kept}) for in_features={in_features} at {n}:{m}, "
            f"got {tuple(values.shape)}"
        )
    if packed_idx.shape[0] != out_f:
        raise ValueError(f"values have {out_f} rows but packed indices have {packed_idx.shape[0]}")
    idx = unpack_indices(packed_idx, kept, m)
    dense = values.new_zeros(out_f, in_features // m, m)
    dense.scatter_(-1, idx.reshape(out_f, -1, n), values.reshape(out_f, -1, n))
    return dense.reshape(out_f, in_features)


def unpack_mask(packed_idx: Tensor, out_features: int, in_features: int, n: int = 2, m: int = 4) -> Tensor:
    """The boolean ``(out, in)`` mask stored in ``packed_idx``."""
    _check_pattern(n, m)
    kept = in_features // m * n
    idx = unpack_indices(packed_idx, kept, m).reshape(out_features, -1, n)
    mask = torch.zeros(out_features, in_features // m, m, dtype=torch.bool, device=packed_idx.device)
    mask.scatter_(-1, idx, True)
    return mask.reshape(out_features, in_features)
