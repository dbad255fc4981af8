"""Model-level benchmark helpers: resident bytes, prompt (prefill) time and greedy decode tokens/s of any Hugging
Face causal LM, eager or with the decode step captured in a CUDA graph."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..models import model_device
from .layers import median_seconds, sync

__all__ = ["model_resident_bytes", "time_prefill", "time_generation", "time_decode_steps"]


def model_resident_bytes(model: nn.Module) -> int:
    """Bytes a model keeps between forwards: every distinct parameter/buffer storage (tied weights once) plus
    the runtime caches of its packed modules."""
    seen: dict[tuple[int, int], int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    cache = sum(m.cache_nbytes() for m in model.modules() if hasattr(m, "cache_nbytes"))
    return sum(seen.values()) + cache


def time_prefill(model: nn.Module, input_ids: Tensor, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Median time of one forward over ``input_ids`` ``(batch, seq)`` without a KV cache (prompt processing).

    Returns ``{"batch", "prompt_tokens", "seconds", "tokens_per_s", "repeats"}`` with tokens/s counting every
    prompt token of the batch.
    """
    device = model_device(model)
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sec = median_seconds(
                lambda: model(input_ids=input_ids, attention_mask=mask, use_cache=False),
                device,
                repeats,
                warmup,
            )
    finally:
        model.train(was_training)
    batch, seq = input_ids.shape
    return {
        "batch": batch,
        "prompt_tokens": seq,
        "seconds": sec,
        "tokens_per_s": batch * seq / sec,
        "repeats": repeats,
    }


def time_generation(
    model: nn.Module, input_ids: Tensor, new_tokens: int, repeats: int = 1, warmup: int = 1
) -> dict[str, Any]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``input_ids`` (batch, seq), KV cache on.

    Returns ``{"batch", "prompt_tokens", "new_tokens", "seconds", "tokens_per_s", "prefill_seconds",
    "decode_tokens_per_s", "repeats"}``: ``tokens_per_s`` is generated tokens (all sequences) over the whole
    call; ``decode_tokens_per_s`` removes one cached prefill forward (timed separately) from it.
    """
    device = model_device(model)
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    kwargs = {
        "attention_mask": mask,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # keeps EOS from ending the run early, so every run has the same length
        "do_sample": False,
        "pad_token_id": pad,
    }
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sec = median_seconds(lambda: model.generate(input_ids, **kwargs), device, repeats, warmup)
            pre = median_seconds(
                lambda: model(input_ids=input_ids, attention_mask=mask, use_cache=True),
                device,
                repeats,
                warmup,
            )
            out = model.generate(input_ids, **kwargs)
    finally:
        model.train(was_training)
    batch, seq = input_ids.shape
    made = out.shape[1] - seq
    decode = sec - pre
    return {
        "batch": batch,
        "prompt_tokens": seq,
        "new_tokens": made,
        "seconds": sec,
        "tokens_per_s": batch * made / sec,
        "prefill_seconds": pre,
        # one new token is the prompt's own: no decode step ran, so there is no decode speed
        "decode_tokens_per_s": batch * (made - 1) / decode if decode > 0 and made > 1 else None,
        "repeats": repeats,
    }


def time_decode_steps(
    model: nn.Module, input_ids: Tensor, steps: int, capture: bool | None = None, repeats: int = 3
) -> dict[str, Any]:
    """Greedy decode tokens/s of ``model`` after the prompt ``input_ids`` ``(batch, seq)``: ``steps`` one-token
    steps (replays of a captured CUDA graph by default on CUDA, see :mod:`armor.runtime.graphs`), timed from
    the first step to the device finishing the last, the prompt and the capture excluded; the median of
    ``repeats`` runs.  A captured run is then checked against eager steps (untimed): ``matches_eager`` says
    whether the replayed graph produced the eager run's tokens.  Returns ``{"batch", "prompt_tokens", "steps",
    "captured", "seconds", "decode_tokens_per_s", "peak_mem_bytes", "matches_eager"}`` (peak CUDA memory
    allocated over the runs, None on CPU; ``matches_eager`` None when nothing was captured)."""
    from ..runtime.graphs import CapturedStep, greedy_decode, start_decoding

    device = model_device(model)
    input_ids = input_ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            step, token, position = start_decoding(model, input_ids, steps + 1, capture)
            captured = isinstance(step, CapturedStep)
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                token.copy_(step().argmax(-1, keepdim=True))
                position += 1
            sync(device)
            times.append(time.perf_counter() - start)
            del step
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    matches = None
    if captured:  # the same tokens from graph replays as from eager steps, or the timing measured a wrong run
        runs = [greedy_decode(model, input_ids, steps + 1, capture=c) for c in (True, False)]
        matches = bool(torch.equal(*runs))
    sec = statistics.median(times)
    batch, seq = input_ids.shape
    return {
        "batch": batch,
        "prompt_tokens": seq,
        "steps": steps,
        "captured": captured,
        "seconds": sec,
        "decode_tokens_per_s": batch * steps / sec,
        "peak_mem_bytes": peak,
        "matches_eager": matches,
    }
