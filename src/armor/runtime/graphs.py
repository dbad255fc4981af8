"""Greedy decoding with the one-token step captured in a CUDA graph (a static KV cache, fixed input buffers).

A decode step of a pruned model on CUDA is dozens of small kernel launches per layer; replaying them as one
captured graph removes the per-launch host cost, which is most of a step's time at batch 1.  What the capture
needs from the modules (and the ``triton`` and ``dense`` backends provide): no host synchronisation, no
Python-side cache built during the step, and every tensor either an input buffer or allocated inside the step.

Usage (any Hugging Face causal LM that takes a :class:`transformers.StaticCache`, pruned or not)::

    from armor.runtime.graphs import greedy_decode
    out = greedy_decode(model, input_ids, new_tokens=128)          # captured on CUDA, eager elsewhere

The prompt is run eagerly (its batch size is not the step's); every later token replays the graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "greedy_decode",
    "start_decoding",
    "decode_step",
    "cache_keyword",
    "cache_counters",
    "capture_blocker",
    "CapturedStep",
]


def cache_keyword(model: nn.Module) -> str:
    """The name ``model.forward`` takes its KV cache under: ``cache`` in recent transformers, ``past_key_values``
    before.  A wrong name would land in ``**kwargs`` and be ignored: decoding would run without the cache."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def decode_step(model: nn.Module, cache, token: Tensor, position: Tensor) -> Callable[[], Tensor]:
    """A function that runs one decode step of ``model`` on the buffers ``token`` ``(B, 1)`` and ``position``
    ``(1,)`` (both updated in place between calls) against the static ``cache``; returns the last logits.

    ``position`` is the one write position: transformers 5's static layers ignore ``cache_position`` and write
    where their own device counter (``cumulative_length``) says, which every forward advances, warm-up and
    capture calls included.  Each step first sets those counters to ``position``, so eager steps and graph
    replays write the slot the caller names, whatever ran before."""
    keyword = cache_keyword(model)
    here = position.view(())

    def step() -> Tensor:
        counters = cache_counters(cache)
        if counters:
            torch._foreach_copy_(counters, [here] * len(counters))
        out = model(
            input_ids=token,
            position_ids=position.expand(token.shape[0], 1),
            cache_position=position,
            use_cache=True,
            **{keyword: cache},
        )
        return out.logits[:, -1]

    return step


def cache_counters(cache) -> list[Tensor]:
    """The device tensors in which transformers' static cache layers count their length (empty for caches that
    take ``cache_position`` instead, as transformers 4's)."""
    return [
        t
        for layer in getattr(cache, "layers", ())
        if isinstance(t := getattr(layer, "cumulative_length", None), Tensor)
    ]


def capture_blocker(cache, length: int) -> str | None:
    """Why a step against ``cache`` cannot be captured for sequences up to ``length`` tokens, or None.  A graph
    replays the Python branches taken at capture: a sliding-window layer whose window fills up switches to a
    rolling update the graph would never take (and keeps its length in a Python int a replay does not advance),
    and a layer without a device counter has state a replay would not update."""
    for i, layer in enumerate(getattr(cache, "layers", ())):
        if not isinstance(getattr(layer, "cumulative_length", None), Tensor):
            return f"cache layer {i} ({type(layer).__name__}) keeps no device length counter"
        if getattr(layer, "is_sliding", False) and layer.max_cache_len < length:
            return f"cache layer {i} slides over {layer.max_cache_len} tokens, fewer than the {length} decoded"
    return None


class CapturedStep:
    """A decode step recorded in a CUDA graph: calling it replays the graph and returns its logits buffer (the
    same tensor every call, overwritten by the next replay)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, logits: Tensor) -> None:
        self.graph, self.logits = graph, logits

    def __call__(self) -> Tensor:
        self.graph.replay()
        return self.logits


def _captured(step: Callable[[], Tensor], device: torch.device) -> CapturedStep:
    """``step`` captured in a CUDA graph: warmed up on a side stream (compiles the kernels, lets the caching
    allocator settle), then recorded once."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    return CapturedStep(graph, logits)


def start_decoding(
    model: nn.Module, input_ids: Tensor, new_tokens: int, capture: bool | None = None
) -> tuple[Callable[[], Tensor], Tensor, Tensor]:
    """Run the prompt ``input_ids`` ``(B, S)`` into a fresh static cache sized for ``new_tokens`` more and set
    up the one-token step.  ``capture``: True captures it in a CUDA graph (an error off CUDA, or for a cache a
    graph cannot replay: see :func:`capture_blocker`); None (default) captures on CUDA when the cache allows,
    else runs eagerly; False runs eagerly.  Returns ``(step, token, position)``: ``token`` ``(B, 1)`` holds the
    prompt's greedy next token and ``position`` its cache position; ``step()`` returns the logits for ``token``
    at ``position``, and the caller advances both in place between steps."""
    from transformers import StaticCache

    device = input_ids.device
    if capture and device.type != "cuda":
        raise ValueError(f"CUDA-graph capture needs CUDA tensors, input_ids are on {device}")
    seq = input_ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=seq + new_tokens)
    positions = torch.arange(seq, device=device)
    prompt = model(input_ids=input_ids, cache_position=positions, use_cache=True, **{cache_keyword(model): cache})
    token = prompt.logits[:, -1].argmax(-1, keepdim=True)
    position = torch.full((1,), seq, dtype=torch.long, device=device)
    step = decode_step(model, cache, token, position)
    blocker = capture_blocker(cache, seq + new_tokens)
    if capture and blocker:
        raise ValueError(f"{type(model).__name__}'s decode step cannot be captured in a CUDA graph: {blocker}")
    if capture is None:
        capture = device.type == "cuda" and blocker is None
    if capture:
        step = _captured(step, device)
    return step, token, position


@torch.inference_mode()
def greedy_decode(model: nn.Module, input_ids: Tensor, new_tokens: int, capture: bool | None = None) -> Tensor:
    """``input_ids`` ``(B, S)`` followed by ``new_tokens`` greedy tokens ``(B, S + new_tokens)``, the same tokens
    as ``model.generate(input_ids, do_sample=False)`` without padding or end-of-sequence stops.  ``capture``
    (default: on CUDA when the cache allows, see :func:`start_decoding`) replays each one-token step from a CUDA
    graph; otherwise the step runs eagerly.  No host synchronisation between steps: the tokens are gathered on
    the device and returned at the end."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    step, token, position = start_decoding(model, input_ids, new_tokens, capture if new_tokens > 1 else False)
    tokens = [input_ids, token.clone()]
    for _ in range(new_tokens - 1):
        token.copy_(step().argmax(-1, keepdim=True))
        tokens.append(token.clone())
        position += 1
    return torch.cat(tokens, dim=1)
