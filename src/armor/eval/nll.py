"""Token negative log-likelihoods of a causal LM without the full-vocabulary logits of a batch.

A causal LM's ``forward`` ends with ``logits = lm_head(hidden)`` (plus, for some families, a fixed transform of
the logits). For perplexity only ``logsumexp(logits) - logits[target]`` per scored position is needed, so
:func:`sum_token_nll` runs the model up to the input of its output-embedding module, then applies that module in
chunks of ``chunk_tokens`` positions x ``chunk_vocab`` vocabulary rows with a float32 running log-sum-exp.

How the hidden states are obtained works for every Hugging Face causal LM: a forward pre-hook on
``model.get_output_embeddings()`` records its input (the final-norm output of every position, exactly what the
model would multiply by the head) and hands the head only the last position. The model therefore computes the
logits of one position per sequence, and those are compared with the chunked computation of the same positions on
every batch: if this module's idea of the logit transform (soft-capping, logit scaling) ever disagrees with the
model's own code, the evaluation stops with an error instead of reporting a wrong number.

Logit transforms applied after the head (read from the text config):
``final_logit_softcapping`` (Gemma 2/3/4, VaultGemma, nanochat: ``cap * tanh(z / cap)``), ``logit_scale`` of the
Cohere family (``z * s``), ``logits_scaling`` of the Granite family (``z / s``). Tied embeddings need nothing
special: the head module is used as it is (its weight is the embedding matrix).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_CHUNK_VOCAB",
    "IGNORE_INDEX",
    "LogitTransform",
    "logit_transform",
    "sum_token_nll",
]

#: Positions per head chunk.
DEFAULT_CHUNK_TOKENS = 1024
#: Vocabulary rows per head chunk (only for a plain ``nn.Linear`` head; other heads are applied whole).
DEFAULT_CHUNK_VOCAB = 16384
#: Label of a position that is not scored (the value ``torch.nn.CrossEntropyLoss`` ignores).
IGNORE_INDEX = -100


class LogitTransform:
    """What the model does to ``lm_head``'s output before returning it, applied here in float32."""

    def __init__(self, softcap: float | None = None, scale: float | None = None) -> None:
        self.softcap = float(softcap) if softcap else None
        self.scale = float(scale) if scale is not None and scale != 1 else None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def to_json(self) -> dict[str, float | None]:
        return {"softcap": self.softcap, "scale": self.scale}


def logit_transform(model: nn.Module) -> LogitTransform:
    """The post-head logit transform of ``model``, from its (text) config."""
    config = getattr(model, "config", None)
    if config is None:
        return LogitTransform()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text_config, "model_type", "") or getattr(config, "model_type", ""))
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = None
    if model_type.startswith("cohere"):
        scale = getattr(model, "logit_scale", None) or getattr(text_config, "logit_scale", None)
    elif model_type.startswith("granite"):
        divisor = getattr(text_config, "logits_scaling", None)
        scale = 1.0 / divisor if divisor else None
    return LogitTransform(softcap, scale)


def _plain_linear_weight(head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` when ``head`` is a plain ``nn.Linear`` with real weights (so vocabulary rows can be
    sliced); ``None`` for anything else (quantised, offloaded, custom heads are applied whole)."""
    if type(head).forward is not nn.Linear.forward or not isinstance(head, nn.Linear):
        return None
    if head.weight.is_meta:
        return None
    return head.weight, head.bias


def _vocab_slice(hidden: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int) -> Tensor:
    """float32 head output for vocabulary rows ``v0:v1`` (the matmul itself in the model's dtype, as the model)."""
    return F.linear(hidden, weight[v0:v1], None if bias is None else bias[v0:v1]).float()


def _nll_rows(
    hidden: Tensor,
    targets: Tensor,
    head: nn.Module,
    transform: LogitTransform,
    chunk_vocab: int,
) -> Tensor:
    """float32 NLL of each row of ``hidden`` (n, H) for ``targets`` (n,), vocabulary chunked."""
    linear = _plain_linear_weight(head)
    if linear is None:
        logits = transform(head(hidden).float())
        return torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)
    weight, bias = linear
    vocab = weight.shape[0]
    lse = torch.full((hidden.shape[0],), -math.inf, dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros_like(lse)
    for v0 in range(0, vocab, chunk_vocab):
        v1 = min(v0 + chunk_vocab, vocab)
        logits = transform(_vocab_slice(hidden, weight, bias, v0, v1))
        lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
        inside = (targets >= v0) & (targets < v1)
        if inside.any():
            rows = inside.nonzero().squeeze(-1)
            target_logit[rows] = logits[rows, targets[rows] - v0]
        del logits
    return lse - target_logit


def _head_logits(hidden: Tensor, head: nn.Module, transform: LogitTransform, chunk_vocab: int) -> Tensor:
    """Full float32 transformed logits of a few rows (for the check against the model's own logits)."""
    linear = _plain_linear_weight(head)
    if linear is None:
        return transform(head(hidden).float())
    weight, bias = linear
    starts = range(0, weight.shape[0], chunk_vocab)
    parts = [transform(_vocab_slice(hidden, weight, bias, v0, v0 + chunk_vocab)) for v0 in starts]
    return torch.cat(parts, -1)


def check_finite_logits(logits: Tensor) -> None:
    """A RuntimeError saying so when the model's logits hold NaN or inf (a damaged or overflowing model): no
    perplexity is computed from them."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise RuntimeError(
            f"the model produces non-finite logits ({bad} of {logits.numel()} NaN or inf on the evaluation text): "
            "its weights hold non-finite values or its activations overflow in this dtype; no perplexity computed"
        )


def _check_logits(mine: Tensor, model_logits: Tensor, dtype: torch.dtype) -> None:
    ref = model_logits.float()
    check_finite_logits(ref)
    if mine.shape != ref.shape:
        raise RuntimeError(
            f"the model's logits have shape {tuple(ref.shape)} but its output embeddings give {tuple(mine.shape)}; "
            "this architecture post-processes its logits in a way armor does not know: evaluate with "
            "chunk_tokens=None (full logits)"
        )
    tol = (2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3) * max(1.0, float(ref.abs().max()))
    diff = float((mine - ref).abs().max())
    if not diff <= tol:
        raise RuntimeError(
            f"chunked logits differ from the model's own by {diff:.3g} (tolerance {tol:.3g}): this architecture "
            "transforms its logits in a way armor does not know; evaluate with chunk_tokens=None (full logits)"
        )


def _full_logits_nll(model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[float, int]:
    """The reference path: the model's full logits, then each scored position's float32 ``logsumexp - logit``,
    summed in float64 (not ``F.cross_entropy``, whose vectorised log-softmax loses up to 3e-5 nats a token on some
    CPU builds)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    check_finite_logits(logits)
    scored = labels != IGNORE_INDEX
    rows = logits[scored].float()
    nll = torch.logsumexp(rows, -1) - rows.gather(-1, labels[scored][:, None]).squeeze(-1)
    return float(nll.double().sum()), int(scored.sum())


@torch.no_grad()
def sum_token_nll(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
    transform: LogitTransform | None = None,
) -> tuple[float, int]:
    """Sum of the NLL (nats) of the positions where ``labels != IGNORE_INDEX``, and their count.

    ``labels[b, i]`` is the token that the logits at ``input_ids[b, i]`` predict (already shifted: the usual
    ``labels[:, :-1] = input_ids[:, 1:]`` for a plain language-model loss). Right padding needs no attention mask
    (the model is causal and padded positions are not scored).

    ``chunk_tokens=None`` computes the model's full logits (the unchunked reference). Otherwise the peak memory
    on top of the model's own forward (which ends with the ``(B, T, H)`` final hidden states) is about::

        chunk_tokens * min(chunk_vocab, V) * (8 + (b if b < 4 else 0) + (8 if soft-capping else 0))
            + B * V * 8                                                                    bytes

    for a batch of ``B`` sequences, ``V`` vocabulary rows and ``b`` bytes per element of the model's dtype: one
    chunk of head output (float32, plus the head's own half-precision output first when ``b < 4``), the
    log-sum-exp's temporary, soft-capping's two temporaries, and the ``B`` last-position logits compared with the
    model's. It does not grow with ``T``, nor with ``V`` beyond those ``B`` rows (for a plain ``nn.Linear`` head;
    another head module is applied to all ``V`` at once, ``chunk_tokens`` positions at a time). With the defaults
    (1024 x 16384) and a float32 model that is 128 MiB + ``8BV``.
    The full-logits path holds ``B * T * V * (b + 4)`` bytes (the logits and their float32 selection) plus the
    cross-entropy's temporaries of the same size.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and labels must both be (batch, tokens), got {input_ids.shape} and {labels.shape}")
    if chunk_tokens is None:
        return _full_logits_nll(model, input_ids, labels)
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk_tokens and chunk_vocab must be >= 1, got {chunk_tokens} and {chunk_vocab}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings to apply in chunks; use chunk_tokens=None (full logits)"
        )
    transform = transform if transform is not None else logit_transform(model)
    hidden, vocab, device = _final_hidden_states(model, head, input_ids, transform, chunk_vocab)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for r0 in range(0, flat_labels.numel(), chunk_tokens):
        chunk_labels = flat_labels[r0 : r0 + chunk_tokens]
        rows = (chunk_labels != IGNORE_INDEX).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        targets = chunk_labels[rows]
        if int(targets.min()) < 0 or int(targets.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got {int(targets.min())}..{int(targets.max())}")
        chunk_hidden = flat_hidden[r0 : r0 + chunk_tokens].to(device)[rows]
        total += _nll_rows(chunk_hidden, targets, head, transform, chunk_vocab).sum(dtype=torch.float64)
        count += rows.numel()
    if not math.isfinite(float(total)):  # NaN/inf logits at a position other than the last (checked above)
        check_finite_logits(torch.tensor([float(total)]))
    return float(total), count


def _final_hidden_states(
    model: nn.Module, head: nn.Module, input_ids: Tensor, transform: LogitTransform, chunk_vocab: int
) -> tuple[Tensor, int, torch.device]:
    """The ``(B, T, H)`` states the model hands its head, its vocabulary size and the head's device.

    The model's forward runs with the head applied to the last position only; those logits are checked against
    the chunked head's, so a model whose head is not what :func:`logit_transform` assumed fails loudly.
    """
    captured: dict[str, Tensor] = {}

    def keep_last_position(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = args[0] if args else kwargs.pop("input")
        captured["hidden"] = hidden
        return (hidden[..., -1:, :], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(keep_last_position, with_kwargs=True)
    try:
        out = model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    hidden = captured.get("hidden")
    if hidden is None or hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
        raise RuntimeError(
            f"{type(model).__name__} did not pass (batch, tokens, hidden) states to its output embeddings; "
            "use chunk_tokens=None (full logits)"
        )
    weight = getattr(head, "weight", None)
    device = weight.device if isinstance(weight, Tensor) and not weight.is_meta else hidden.device
    _check_logits(
        _head_logits(hidden[:, -1].to(device), head, transform, chunk_vocab), out.logits[:, -1], hidden.dtype
    )
    return hidden, out.logits.shape[-1], device

