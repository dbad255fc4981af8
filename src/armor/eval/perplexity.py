"""Perplexity on any text: documents joined, tokenised once, non-overlapping windows, ``exp(mean NLL)``.

This is the protocol of ALGORITHM.md §9; name results after the text they were measured on (e.g. "perplexity
on the Lee news corpus"), never after a benchmark that was not used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.calibration import model_device, tokenize_documents

__all__ = ["PerplexityResult", "perplexity", "perplexity_windows"]


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def perplexity_windows(tokens: Tensor, seqlen: int, max_windows: int | None = None, name: str = "text") -> Tensor:
    """``(W, seqlen)`` non-overlapping windows from the start of a 1-D token stream (the tail is dropped)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    total = tokens.numel()
    if total < seqlen:
        raise ValueError(f"seqlen {seqlen} is larger than the {name} ({total} tokens)")
    w = total // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        w = min(w, max_windows)
    return tokens[: w * seqlen].reshape(w, seqlen)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    text: str | Sequence[str] | Tensor,
    tokenizer: Any = None,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
    name: str = "evaluation text",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string, a list of documents, or 1-D token ids).

    Every window is scored on its own (no context carried over), its first token is not predicted.
    """
    start = time.perf_counter()
    if isinstance(text, Tensor):
        tokens = text.reshape(-1).long()
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to evaluate on text")
        docs = [text] if isinstance(text, str) else list(text)
        tokens = tokenize_documents(tokenizer, docs, name=name)
    windows = perplexity_windows(tokens, seqlen, max_windows, name=name)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    count = 0
    from tqdm.auto import tqdm

    try:
        for s in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = windows[s : s + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # float32 for the log-softmax: half-precision NLL sums drift over many tokens.
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(nll)
            count += batch[:, 1:].numel()
            del logits
    finally:
        model.train(was_training)
    mean = total_nll / count
    return PerplexityResult(math.exp(mean), mean, count, windows.shape[0], seqlen, time.perf_counter() - start)
