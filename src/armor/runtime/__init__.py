"""Inference runtime for pruned layers: packed n:m storage, :class:`ArmorLinear` / :class:`SparseLinear`
modules with their backend table (:data:`BACKENDS`), CPU kernels that run from the packed state
(:mod:`armor.runtime.kernels`, numba) and GPU kernels (:mod:`armor.runtime.gpu_kernels`, Triton)."""

from .kernels import numba_available
from .modules import (
    BACKEND_CHOICES,
    BACKENDS,
    CPU_PACKED_MAX_TOKENS,
    TRITON_MAX_TOKENS,
    ArmorLinear,
    Backend,
    SparseLinear,
    backend_status,
    empty_module_from_spec,
    module_from_result,
    packed_status,
    semi_structured_status,
    state_nbytes,
    triton_status,
)
from .packing import pack_nm, unpack_mask, unpack_nm

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
    "numba_available",
    "CPU_PACKED_MAX_TOKENS",
    "TRITON_MAX_TOKENS",
    "state_nbytes",
    "pack_nm",
    "unpack_nm",
    "unpack_mask",
]
