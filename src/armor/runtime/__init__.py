"""Inference runtime for pruned layers: packed n:m storage, :class:`ArmorLinear` / :class:`SparseLinear`
modules and layer/model benchmarks (:mod:`armor.runtime.bench`)."""

from .modules import (
    ArmorLinear,
    SparseLinear,
    empty_module_from_spec,
    module_from_result,
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
    "state_nbytes",
    "pack_nm",
    "unpack_nm",
    "unpack_mask",
]
