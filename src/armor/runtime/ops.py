"""The runtime kernels as PyTorch operators (``torch.ops.armor.*``), so that ``torch.compile`` traces a pruned
model whole.

Dynamo cannot look inside a numba function, nor through the Python tile logic around a Triton launch: called as
they are, every packed layer ends a graph (a 30-layer model falls into hundreds of pieces and soon hits dynamo's
recompile limit).  Registered as operators with a shape function each, a kernel is one opaque node of a single
graph: Inductor fuses the code around it (norms, activations, attention) and a ``mode="reduce-overhead"``
compile can record the step in a CUDA graph, which the Triton kernels allow (no host synchronisation, fresh
outputs).

The functions here have the kernels' signatures.  While dynamo traces they call the operator; eagerly they call
the kernel directly, since an operator call costs several microseconds more (a few percent of a small model's
decode step).
"""

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from . import gpu_kernels, kernels

__all__ = [
    "nm_matmul",
    "armor_matmul",
    "unpack_dense",
    "nm_matmul_triton",
    "armor_matmul_triton",
    "unpack_dense_cuda",
]


def _traced_as(op, eager: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``eager`` when called eagerly, the operator ``op`` while dynamo traces."""

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager(*args)

    call.__name__, call.__doc__ = eager.__name__, eager.__doc__
    return call


# -- CPU: the numba kernels (float32 results) --------------------------------------------------------------------
@torch.library.custom_op("armor::packed_nm_matmul", mutates_args=())
def _packed_nm_matmul(values: Tensor, indices: Tensor, x: Tensor, n: int, m: int) -> Tensor:
    return kernels.nm_matmul(values, indices, x, n, m)


@_packed_nm_matmul.register_fake
def _(values, indices, x, n, m):
    return x.new_empty((x.shape[0], values.shape[0]), dtype=torch.float32)


@torch.library.custom_op("armor::packed_armor_matmul", mutates_args=())
def _packed_armor_matmul(
    b_blocks: Tensor, values: Tensor, indices: Tensor, a_blocks: Tensor, x: Tensor, n: int, m: int
) -> Tensor:
    return kernels.armor_matmul(b_blocks, values, indices, a_blocks, x, n, m)


@_packed_armor_matmul.register_fake
def _(b_blocks, values, indices, a_blocks, x, n, m):
    return x.new_empty((x.shape[0], values.shape[0]), dtype=torch.float32)


@torch.library.custom_op("armor::packed_unpack", mutates_args=())
def _packed_unpack(values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    return kernels.unpack_dense(values, indices, n, m)


@_packed_unpack.register_fake
def _(values, indices, n, m):
    return values.new_empty((values.shape[0], values.shape[1] // n * m))


# -- CUDA: the Triton kernels (results in the values' dtype, bias added) -----------------------------------------
@torch.library.custom_op("armor::triton_nm_matmul", mutates_args=())
def _triton_nm_matmul(
    values: Tensor, indices: Tensor, x: Tensor, n: int, m: int, bias: Optional[Tensor] = None  # noqa: UP045
) -> Tensor:
    return gpu_kernels.nm_matmul_triton(values, indices, x, n, m, bias)


@_triton_nm_matmul.register_fake
def _(values, indices, x, n, m, bias=None):
    return x.new_empty((x.shape[0], values.shape[0]), dtype=values.dtype)


@torch.library.custom_op("armor::triton_armor_matmul", mutates_args=())
def _triton_armor_matmul(
    b_blocks: Tensor,
    values: Tensor,
    indices: Tensor,
    a_blocks: Tensor,
    x: Tensor,
    n: int,
    m: int,
    bias: Optional[Tensor] = None,  # noqa: UP045
) -> Tensor:
    return gpu_kernels.armor_matmul_triton(b_blocks, values, indices, a_blocks, x, n, m, bias)


@_triton_armor_matmul.register_fake
def _(b_blocks, values, indices, a_blocks, x, n, m, bias=None):
    return x.new_empty((x.shape[0], values.shape[0]), dtype=values.dtype)


@torch.library.custom_op("armor::triton_unpack", mutates_args=())
def _triton_unpack(values: Tensor, indices: Tensor, in_features: int, n: int, m: int) -> Tensor:
    return gpu_kernels.unpack_dense_cuda(values, indices, in_features, n, m)


@_triton_unpack.register_fake
def _(values, indices, in_features, n, m):
    return values.new_empty((values.shape[0], in_features))


nm_matmul = _traced_as(_packed_nm_matmul, kernels.nm_matmul)
armor_matmul = _traced_as(_packed_armor_matmul, kernels.armor_matmul)
unpack_dense = _traced_as(_packed_unpack, kernels.unpack_dense)
nm_matmul_triton = _traced_as(_triton_nm_matmul, gpu_kernels.nm_matmul_triton)
armor_matmul_triton = _traced_as(_triton_armor_matmul, gpu_kernels.armor_matmul_triton)
unpack_dense_cuda = _traced_as(_triton_unpack, gpu_kernels.unpack_dense_cuda)
