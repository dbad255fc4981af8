"""Calibration: the statistics of each linear layer's input, gathered block by block.

The model runs one decoder block at a time over stored activations (:func:`capture_block_inputs` records what
the first block receives and the keyword arguments the model passes every block; :func:`run_block` runs one
block over them).  While a block runs, :class:`StatsHooks` feed each selected layer's input into a float32
:class:`~armor.stats.StatsAccumulator`, so memory is bounded by one batch of activations plus the statistics.
Activations live in memory up to a budget and in files beyond it (:class:`ActivationStore`).

This is the same arithmetic as one forward pass of the whole model with hooks (each block sees exactly the
tensors it would see there), and it is what lets a checkpoint be calibrated without ever being loaded whole, and
statistics be taken from the blocks pruned so far (sequential calibration).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .stats import LayerStats, StatsAccumulator

__all__ = ["StatsHooks", "ActivationStore", "BlockCalls", "capture_block_inputs", "run_block"]

#: Per block: ``{hidden_states.shape: (extra positional args, keyword args)}`` as the model called it.
BlockCalls = dict[tuple[int, ...], tuple[tuple[Any, ...], dict[str, Any]]]


class StatsHooks:
    """Forward hooks that accumulate the input statistics of the given linear layers.

    ``kinds[name]`` is ``"diagonal"`` or ``"full"`` (full adds ``X^T X``).  Layers called one after another on the
    very same tensor (q/k/v, gate/up) share one accumulator when their kinds agree: their statistics are
    identical, and the sharing saves the repeated work.  Call :meth:`new_batch` before each forward and
    :meth:`finish` at the end (it removes the hooks).
    """

    def __init__(self, layers: Mapping[str, nn.Linear], kinds: Mapping[str, str]) -> None:
        self.kinds = dict(kinds)
        self.accs: dict[str, StatsAccumulator] = {}
        self.owner: dict[str, str] = {}
        self._last: tuple[Any, str] | None = None
        self.names = list(layers)
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in layers.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0]
            if name not in self.owner:
                last = self._last
                if last is not None and last[0] is x and self.kinds[self.owner[last[1]]] == self.kinds[name]:
                    self.owner[name] = self.owner[last[1]]
                else:
                    self.owner[name] = name
                    full = self.kinds[name] == "full"
                    self.accs[name] = StatsAccumulator(mod.in_features, full=full, device=x.device)
            if self.owner[name] == name:
                self.accs[name].update(x)
            self._last = (x, name)

        return hook

    def new_batch(self) -> None:
        self._last = None

    def finish(self, required: bool = True) -> dict[str, LayerStats]:
        """The statistics of every layer the calibration forward called.  A layer it never called (an expert the
        router sent no calibration token to) is a RuntimeError naming it when ``required``, else left out."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None
        missing = [n for n in self.names if n not in self.owner]
        if missing and required:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise RuntimeError(
                f"layers never called during calibration: {', '.join(missing[:5])}{more}; the calibration forward "
                "did not reach them (a mixture-of-experts router that sent none of the calibration tokens to an "
                "expert is one case): calibrate on more text (more or longer sequences), leave them dense (exclude "
                "them), or prune with a method that needs no statistics (magnitude)"
            )
        finals = {n: acc.finalize() for n, acc in self.accs.items()}
        return {n: finals[self.owner[n]] for n in self.names if n in self.owner}


class ActivationStore:
    """Per-batch tensors: in memory up to ``budget_bytes`` in all, the rest in files under ``folder``."""

    def __init__(self, budget_bytes: int, folder: Path) -> None:
        self.budget = max(0, int(budget_bytes))
        self.folder = Path(folder)
        self._items: list[Tensor | Path] = []
        self._rows: list[int] = []  # each entry's first dimension, known without reading a spilled file
        self.mem_bytes = 0
        self.disk_bytes = 0

    def append(self, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        self._rows.append(int(t.shape[0]))
        nbytes = t.numel() * t.element_size()
        if self.mem_bytes + nbytes <= self.budget:
            self._items.append(t)
            self.mem_bytes += nbytes
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="act-", suffix=".safetensors", dir=self.folder)
        os.close(fd)
        save_file({"x": t}, name)
        self._items.append(Path(name))
        self.disk_bytes += nbytes

    def __len__(self) -> int:
        return len(self._items)

    def rows(self, i: int) -> int:
        """The first dimension (sequences) of entry ``i``."""
        return self._rows[i]

    def __getitem__(self, i: int) -> Tensor:
        item = self._items[i]
        if isinstance(item, Tensor):
            return item
        with safe_open(str(item), framework="pt", device="cpu") as f:
            return f.get_tensor("x")

    def close(self) -> None:
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items.clear()
        self._rows.clear()
        self.mem_bytes = self.disk_bytes = 0


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    last: int,
    input_ids: Tensor,
    batch_size: int,
    store: ActivationStore,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[BlockCalls]:
    """Run the model's forward up to block ``last`` with every block replaced by a recorder.

    The first block's inputs go to ``store`` (one entry per batch); returned is, per block, how the model called
    it.  Calibration batches carry no padding, so the call arguments depend only on the batch's shape and one
    record per shape serves every batch.  Nothing after block ``last`` (final norm, head) runs.
    """
    calls: list[BlockCalls] = [{} for _ in blocks]

    def recorder(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                store.append(hidden)
            calls[i].setdefault(tuple(hidden.shape), (rest, dict(kwargs)))
            if i == last:
                raise _StopForward
            return hidden  # later blocks only need their call arguments, not real inputs

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # instance attribute: shadows the class's forward for this pass only
    try:
        starts = range(0, input_ids.shape[0], batch_size)
        for s in tqdm(starts, desc="capture", unit="batch", disable=not progress, leave=False):
            try:
                model(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model's forward finished without calling its last decoder block")
    finally:
        for block in blocks:
            del block.forward
    return calls


@torch.no_grad()
def run_block(
    block: nn.Module,
    calls: BlockCalls,
    inputs: ActivationStore,
    outputs: ActivationStore | None,
    device: torch.device | str = "cpu",
    hooks: StatsHooks | None = None,
    label: str | None = None,
) -> None:
    """Run ``block`` over every stored input batch (as the model called it); outputs to ``outputs`` if given.

    ``label`` names the block in the ValueError raised when an output holds NaN or infinite values (``None``: not
    checked): a block that overflows would otherwise feed garbage statistics to every later layer.
    """
    for j in range(len(inputs)):
        x = inputs[j].to(device)
        rest, kwargs = calls[tuple(x.shape)]
        if hooks is not None:
            hooks.new_batch()
        y = block(x, *rest, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        if label is not None and not bool(torch.isfinite(y).all()):
            bad = int((~torch.isfinite(y)).sum())
            raise ValueError(
                f"{label} outputs {bad} NaN or infinite values of {y.numel()} on calibration batch {j + 1}: its "
                f"activations overflow in {str(y.dtype).removeprefix('torch.')} (run in bfloat16 or float32) or "
                "its weights are damaged; nothing is saved from a model that computes NaN"
            )
        if outputs is not None:
            outputs.append(y)
