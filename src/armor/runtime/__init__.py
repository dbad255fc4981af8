"""Inference runtime for pruned layers: packed n:m storage, :class:`ArmorLinear` / :class:`SparseLinear`
modules, CPU kernels that run from the packed state (:mod:`armor.runtime.kernels`, numba) and layer/model
benchmarks (:mod:`armor.runtime.bench`)."""

from .kernels import numba_available
from .modules import (
    CPU_PACKED_MAX_TOKENS,
    ArmorLinear,
    SparseLinear,
    empty_module_from_spec,
    module_from_result,
    packed_status,
    semi_structured_status,
    state_nbytes,
)
from .packing import pack_nm, unpack_mask, unpack_nm

__all__ = [
    "ArmorLinear",
    "SparseLinear",
    "module_from_result",
    "empty_module_from_spec",
    "semi_structured_status",
    "packed_status",
    "numba_available",
    "CPU_PACKED_MAX_TOKENS",
    "state_nbytes",
    "pack_nm",
    "unpack_nm",
    "unpack_mask",
]
