"""Perplexity of a model folder computed block by block, so evaluation holds no more than one decoder block.

The windows' embeddings are captured, every decoder block runs over them in turn (loaded, run, released), and
the final hidden states go through the model's own head: the model's forward is called once more per batch with
its decoder blocks replaced by stand-ins that hand over the stored final states, so the final norm, the head and
any logit soft-capping are the model's own and the NLL is computed by :func:`armor.eval.perplexity` exactly as
for a model in memory.  Only the non-overlapping-window protocol is supported this way.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..calibration import ActivationStore, capture_block_inputs, run_block
from ..eval import PerplexityResult, perplexity, perplexity_windows
from ..models import check_token_ids
from .sources import CheckpointSource

__all__ = ["perplexity_blockwise"]


@torch.no_grad()
def perplexity_blockwise(
    folder: str | Path,
    tokens: Tensor,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    activation_budget: int = 1 << 30,
    progress: bool = False,
    name: str = "evaluation text",
) -> PerplexityResult:
    """Perplexity of the (dense or pruned) model in ``folder`` on ``tokens`` (1-D ids), one block in memory.

    Equal to :func:`armor.eval.perplexity` on the loaded model with the same windows and batches.
    """
    start = time.perf_counter()
    windows = perplexity_windows(tokens.reshape(-1).long(), seqlen, max_windows, name=name)
    source = CheckpointSource(folder, dtype, device)
    check_token_ids(windows, source.model, name)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"armor-eval-{os.getpid()}-{time.time_ns()}"
    states = ActivationStore(activation_budget // 2, work)
    nxt: ActivationStore | None = None
    last = len(source.blocks) - 1
    try:
        source.load_embeddings()
        calls = capture_block_inputs(source.model, source.blocks, last, windows, batch_size, states, source.device)
        source.release_embeddings()
        for i in range(last + 1):
            block = source.load_block(i)
            nxt = ActivationStore(activation_budget // 2, work)
            run_block(block, calls[i], states, nxt, source.device)
            source.release_block(i)
            states.close()
            states, nxt = nxt, None
        source.load_embeddings(with_head=True)
        finals: Iterator[Tensor] = (states[j] for j in range(len(states)))
        for i, block in enumerate(source.blocks):
            block.forward = _hand_over(finals, source.device) if i == 0 else _pass_through
        try:
            result = perplexity(source.model, windows.reshape(-1), seqlen=seqlen, batch_size=batch_size,
                                progress=progress, name=name)
        finally:
            for block in source.blocks:
                del block.forward
    finally:
        states.close()
        if nxt is not None:
            nxt.close()
        shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _hand_over(finals: Iterator[Tensor], device: torch.device) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        final = next(finals).to(device=device, dtype=hidden.dtype)
        if final.shape != hidden.shape:
            raise RuntimeError("block-wise evaluation: batches came in an unexpected order")
        return final

    return forward


def _pass_through(*args: Any, **kwargs: Any) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]
