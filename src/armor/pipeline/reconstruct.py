"""Block-wise reconstruction: tune a pruned decoder block's continuous tensors to reproduce the dense block.

Each layer is pruned against its own proxy loss, which cannot see how its error compounds through the block
(attention softmax, gating, residual adds).  Once a block's layers are pruned, :func:`reconstruct_block` tunes the
tensors the packed format stores as free values — ARMOR's wrapper blocks ``A'``, ``B'`` and the kept core values,
or a plain n:m layer's kept values — with Adam, so that the pruned block fed the PRUNED model's own inputs
reproduces the DENSE block's outputs on the dense model's inputs (the hidden states of the dense model after this
block).  Masks, pattern, block sizes, biases and every tensor outside the pruned layers stay as they are, so the
stored format does not change.  Feeding the pruned inputs lets a block also correct what earlier blocks left.

The error is judged on calibration sequences held out of training: when the tuned block's held-out error (as
stored, in the module dtype) is not lower than the pruned block's, the block keeps its pruned tensors.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import ActivationStore, BlockCalls
from ..factors import block_product
from ..models import get_module, set_module
from ..runtime.packing import unpack_indices

__all__ = [
    "COMPUTE_DTYPES", "LOSSES", "SCHEDULES", "ReconstructSettings", "BlockReconstruction", "reconstruct_block",
    "split_batches", "batch_rows",
]

#: Training matmul dtypes: float32, or a 16-bit type under autocast; ``auto``: bfloat16 where the device has fast
#: bfloat16 matmuls (CUDA, or a CPU oneDNN runs natively in bfloat16), else float32.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: What "output error" means: ``mse``, the relative squared error of the whole output
#: ``sum |y - t|^2 / sum |t|^2``; ``token``, each token's squared error relative to its own norm, averaged over
#: tokens (the scale the next RMSNorm/LayerNorm sees; massive-activation tokens no longer dominate).
LOSSES = ("mse", "token")
#: Default steps per block in passes over the calibration sequences: 4 measured best at 64 and at 128 sequences
#: (one step per sequence at a batch of 4; fewer passes underfit, 8 overfit: benchmarks/RESULTS_reconstruction.md).
DEFAULT_PASSES = 4
#: Learning-rate schedules over a block's steps: ``constant``, or ``cosine`` decay from ``lr`` to zero.
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ReconstructSettings:
    """How each block is tuned.

    Attributes:
        steps: Adam steps per block, each on one calibration batch (the driver's ``batch_size`` sequences),
            cycling over the training batches; ``None``: :data:`DEFAULT_PASSES` passes over the calibration
            sequences (:meth:`for_run`): one step per sequence at a batch of 4.
        lr: Adam's learning rate (its peak, under a schedule).
        schedule: how the learning rate moves over a block's steps (:data:`SCHEDULES`).
        holdout: calibration sequences held out of training to judge the result, taken as whole batches from the
            end of the calibration set (0: judged on the training batches).
        loss: the output error trained on and judged by (:data:`LOSSES`).
        compute_dtype: the dtype of the training forward and backward matmuls (``"bfloat16"``/``"float16"`` run
            them under autocast, with float32 parameters, optimizer state and loss); the held-out judgement
            always runs the stored model.
    """

    steps: int | None = None
    lr: float = 3e-4
    schedule: str = "constant"
    holdout: int = 8
    loss: str = "mse"
    compute_dtype: str = "auto"

    def check(self) -> None:
        """Raise a ValueError naming the first invalid setting."""
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"reconstruction steps must be an integer >= 1 or None, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"reconstruction learning rate must be in (0, 1), got {self.lr!r}")
        if not isinstance(self.holdout, int) or self.holdout < 0:
            raise ValueError(f"reconstruction holdout must be an integer >= 0, got {self.holdout!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"reconstruction schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"reconstruction loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"reconstruction compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_run(self, device: torch.device | str, batches: int) -> ReconstructSettings:
        """These settings as a run on ``device`` with ``batches`` calibration batches uses them (what it records
        and fingerprints): the ``auto`` dtype and the default steps (:data:`DEFAULT_PASSES` x ``batches``)."""
        s = self if self.steps is not None else dataclasses.replace(self, steps=DEFAULT_PASSES * max(1, batches))
        if s.compute_dtype == "auto":
            fast = _fast_bf16(torch.device(device))
            s = dataclasses.replace(s, compute_dtype="bfloat16" if fast else "float32")
        return s


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe is not None and probe())
    return False


@dataclass
class BlockReconstruction:
    """What :func:`reconstruct_block` did to one block.  Errors and losses are the settings' output error
    (:data:`LOSSES`)."""

    block: int
    kept: bool  # the tuned tensors were kept (False: they would not have lowered the held-out error)
    error_before: float  # held-out output error of the block as pruned
    error_after: float  # held-out output error of the tuned block, as stored (before any revert)
    first_loss: float  # training loss (output error of the batch) of the first and the last step
    last_loss: float
    steps: int
    seconds: float
    #: per layer: relative output error against the dense layer on the same (pruned-model) held-out inputs,
    #: before and after tuning (after: as finally stored)
    layer_errors: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _TrainView(nn.Module):
    """A differentiable float32 stand-in for a packed layer: its free tensors as parameters, its mask fixed.

    Its forward keeps no weight-sized tensor from forward to backward (:class:`_RecomputedLinear`): the dense
    ``W_hat`` and the wrapper products' intermediates are rebuilt in the backward, so a block's training step holds
    its activations and one layer's ``W_hat`` at a time, not every layer's."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        n, m, kept = module.n, module.m, module.values.shape[1]
        pos = unpack_indices(module.indices, kept, m)  # in-group position of every kept entry
        cols = torch.arange(kept, device=pos.device) // n * m + pos  # column of every kept entry
        # held as int32 (half an int64 index's bytes), widened for each use
        self.register_buffer("cols", cols.to(torch.int32 if module.in_features < 2**31 else torch.int64))
        self.shape = (module.out_features, module.in_features)
        self.values = nn.Parameter(module.values.detach().float().clone())
        wrapped = hasattr(module, "a_blocks")
        self.a_blocks = nn.Parameter(module.a_blocks.detach().float().clone()) if wrapped else None
        self.b_blocks = nn.Parameter(module.b_blocks.detach().float().clone()) if wrapped else None
        self.bias = None if module.bias is None else module.bias.detach()

    def weight_of(self, values: Tensor, a_blocks: Tensor | None, b_blocks: Tensor | None) -> Tensor:
        """The dense weight ``A' (values on the mask) B'`` of the given free tensors."""
        core = values.new_zeros(self.shape).scatter(1, self.cols.long(), values)
        return core if a_blocks is None else block_product(a_blocks, core, b_blocks)

    def weight_hat(self) -> Tensor:
        return self.weight_of(self.values, self.a_blocks, self.b_blocks)

    def forward(self, x: Tensor) -> Tensor:
        return _RecomputedLinear.apply(x, self, self.values, self.a_blocks, self.b_blocks)

    @torch.no_grad()
    def write_back(self, module: nn.Module) -> None:
        """Store the tuned tensors in ``module`` (rounded to its dtype)."""
        module.values.copy_(self.values.to(module.values.dtype))
        if self.a_blocks is not None:
            module.a_blocks.copy_(self.a_blocks.to(module.a_blocks.dtype))
            module.b_blocks.copy_(self.b_blocks.to(module.b_blocks.dtype))
        if hasattr(module, "drop_cache"):
            module.drop_cache()


def _linear_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes in for input ``x`` here: autocast's, when it is on for ``x``'s device."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _RecomputedLinear(torch.autograd.Function):
    """``F.linear(x, view.weight_hat(), view.bias)``, computed in the dtype autocast gives it, whose backward
    rebuilds the weight from the view's parameters instead of keeping it: only ``x`` and the parameters are saved.
    Rebuilding costs one ``weight_hat`` per layer and step, small beside the layer's matmuls over a batch of tokens."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, view: _TrainView, *params: Tensor | None) -> Tensor:
        dtype, dev = _linear_dtype(x), x.device.type
        ctx.view, ctx.dtype, ctx.device = view, dtype, dev
        ctx.amp = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, *params)
        w = view.weight_of(*params).to(dtype)
        return F.linear(x.to(dtype), w, None if view.bias is None else view.bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        leaves = [None if p is None else p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad(), torch.autocast(ctx.device, dtype=ctx.amp[1], enabled=ctx.amp[0]):
            w = ctx.view.weight_of(*leaves).to(ctx.dtype)  # what forward used, now with its graph
        grad = grad.to(ctx.dtype)
        grad_x = (grad @ w.detach()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.to(ctx.dtype).reshape(-1, x.shape[-1])
        wanted = [p for p in leaves if p is not None]
        found = iter(torch.autograd.grad(w, wanted, grad_w.to(w.dtype)))
        return (grad_x, None, *(None if p is None else next(found) for p in leaves))


def _free_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {k: getattr(module, k).detach().clone() for k in ("values", "a_blocks", "b_blocks") if hasattr(module, k)}


def _output(y: Any) -> Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def _error_terms(y: Tensor, t: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Numerator and denominator of the output error of one batch (sums, so batches add up)."""
    y, t = y.float(), t.float()
    if loss == "token":
        per_token = ((y - t) ** 2).sum(-1) / (t**2).sum(-1).clamp_min(1e-12)
        return per_token.sum(), torch.tensor(float(per_token.numel()))
    return ((y - t) ** 2).sum(), (t**2).sum()


def batch_rows(sequences: int, batch_size: int) -> list[int]:
    """Sequences per calibration batch: consecutive batches of ``batch_size``, the last one what is left."""
    return [min(batch_size, sequences - start) for start in range(0, sequences, batch_size)]


def split_batches(rows: Sequence[int], holdout: int) -> tuple[list[int], list[int]]:
    """Training and held-out indices of calibration batches of ``rows`` sequences each: whole batches from the
    end hold at least ``holdout`` sequences (none held out: judged on the training batches).

    Raises:
        ValueError: when the held-out batches leave no batch to train on.
    """
    held: list[int] = []
    count = 0
    for j in reversed(range(len(rows))):
        if count >= holdout:
            break
        held.insert(0, j)
        count += rows[j]
    train = [j for j in range(len(rows)) if j not in held]
    if not train:
        raise ValueError(
            f"reconstruction holds out {holdout} sequences as whole calibration batches from the end: the "
            f"{sum(rows)} calibration sequences make {len(rows)} batch(es) of up to {max(rows, default=0)}, and "
            f"holding out {holdout} takes all of them, leaving none to train on; lower the holdout, calibrate on "
            "more sequences or use smaller batches"
        )
    return train, held or train


def _split(inputs: ActivationStore, holdout: int) -> tuple[list[int], list[int]]:
    return split_batches([inputs.rows(j) for j in range(len(inputs))], holdout)


class _LayerErrors:
    """Hooks measuring each pruned layer's relative output error against its dense weight on the same input."""

    def __init__(self, modules: dict[str, nn.Module], dense: dict[str, Tensor]) -> None:
        self.sums = {name: [0.0, 0.0] for name in dense}
        self.handles = [modules[name].register_forward_hook(self._hook(name, w)) for name, w in dense.items()]

    def _hook(self, name: str, weight: Tensor):
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            ref = F.linear(args[0].float(), weight.float(), None if mod.bias is None else mod.bias.float())
            self.sums[name][0] += float(((out.float() - ref) ** 2).sum())
            self.sums[name][1] += float((ref**2).sum())

        return hook

    def finish(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        return {name: num / max(den, 1e-30) for name, (num, den) in self.sums.items()}


@torch.no_grad()
def _error(block: nn.Module, calls: BlockCalls, inputs: ActivationStore, targets: ActivationStore,
           idx: Sequence[int], device: torch.device, loss: str,
           layers: _LayerErrors | None = None) -> tuple[float, dict]:
    """The block's output error on batches ``idx`` (and each hooked layer's relative error, when given)."""
    num = den = 0.0
    try:
        for j in idx:
            x = inputs[j].to(device)
            rest, kwargs = calls[tuple(x.shape)]
            a, b = _error_terms(_output(block(x, *rest, **kwargs)), targets[j].to(device), loss)
            num += float(a)
            den += float(b)
    finally:
        per_layer = layers.finish() if layers is not None else {}
    return num / max(den, 1e-30), per_layer


def _train(block: nn.Module, views: list[_TrainView], calls: BlockCalls, inputs: ActivationStore,
           targets: ActivationStore, train: list[int], s: ReconstructSettings,
           device: torch.device) -> tuple[float, float]:
    """Adam on the views' parameters; returns the first and last step's loss (NaN: training diverged)."""
    params = [p for v in views for p in v.parameters()]
    opt = torch.optim.Adam(params, lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.steps) if s.schedule == "cosine" else None
    first = last = float("nan")
    low = s.compute_dtype != "float32"
    autocast = torch.autocast(device.type, dtype=getattr(torch, s.compute_dtype), enabled=low)
    with torch.enable_grad(), autocast:
        for step in range(s.steps):
            j = train[step % len(train)]
            x, t = inputs[j].to(device), targets[j].to(device)
            rest, kwargs = calls[tuple(x.shape)]
            num, den = _error_terms(_output(block(x, *rest, **kwargs)), t, s.loss)
            loss = num / den.clamp_min(1e-30)
            last = float(loss.detach())
            if step == 0:
                first = last
            if last != last or last in (float("inf"), float("-inf")):
                return first, float("nan")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return first, last


def reconstruct_block(
    root: nn.Module,
    block: nn.Module,
    index: int,
    names: Sequence[str],
    calls: BlockCalls,
    inputs: ActivationStore,
    targets: ActivationStore,
    settings: ReconstructSettings,
    device: torch.device | str,
    dense_weights: dict[str, Tensor] | None = None,
) -> BlockReconstruction:
    """Tune the packed layers ``names`` (dotted paths in ``root``) of ``block`` in place.

    ``inputs`` are the block's inputs in the pruned model, ``targets`` the dense model's hidden states after the
    block, batch for batch.  On return the layers hold the tuned tensors, or their original ones when tuning
    did not lower the held-out error.  ``dense_weights`` (name -> the dense weight) adds each layer's own output
    error to the report.
    """
    start = time.perf_counter()
    device = torch.device(device)
    settings = settings.for_run(device, len(inputs))
    train, held = _split(inputs, settings.holdout)
    modules = {name: get_module(root, name) for name in names}
    dense = dense_weights or {}
    before, layers_before = _error(block, calls, inputs, targets, held, device, settings.loss,
                                   _LayerErrors(modules, dense))
    originals = {name: _free_tensors(mod) for name, mod in modules.items()}
    views = {name: _TrainView(mod) for name, mod in modules.items()}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # only the views' tensors learn
        p.requires_grad_(False)
    try:
        for name, view in views.items():
            set_module(root, name, view)
        first, last = _train(block, list(views.values()), calls, inputs, targets, train, settings, device)
    finally:
        for name, mod in modules.items():
            set_module(root, name, mod)
        for p in frozen:
            p.requires_grad_(True)
    after, layers_after = float("nan"), layers_before
    if last == last:  # finite training: store the result and judge it as stored
        for name, view in views.items():
            view.write_back(modules[name])
        after, layers_after = _error(block, calls, inputs, targets, held, device, settings.loss,
                                     _LayerErrors(modules, dense))
    kept = after < before  # False for NaN too
    if not kept:
        with torch.no_grad():
            for name, mod in modules.items():
                for k, v in originals[name].items():
                    getattr(mod, k).copy_(v)
                if hasattr(mod, "drop_cache"):
                    mod.drop_cache()
    final = layers_after if kept else layers_before
    return BlockReconstruction(index, kept, before, after, first, last, settings.steps,
                               round(time.perf_counter() - start, 3),
                               {name: (layers_before[name], final[name]) for name in dense})
