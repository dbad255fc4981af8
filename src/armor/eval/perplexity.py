"""Perplexity on any text under a named, recorded protocol, in bounded memory.

The protocol (window length, overlap, document joining, BOS handling, which tokens are scored) is a
:class:`~armor.eval.protocols.PerplexityProtocol`; the default ``"armor"`` preset is the SparseGPT/Wanda/ARMOR
scripts' protocol (documents joined with blank lines, tokenised once, non-overlapping windows, ``exp(mean NLL)``).
Name results after the text they were measured on (e.g. "perplexity on the Lee news corpus"), never after a
benchmark that was not used.

Memory: the NLL of each batch is computed by :func:`armor.eval.nll.sum_token_nll` in chunks of ``chunk_tokens``
positions x ``chunk_vocab`` vocabulary rows, so the full-vocabulary logits of a batch are never held
(``chunk_tokens=None`` restores the full-logits computation). See that function for the peak-memory formula.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import check_token_ids, model_device
from .nll import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB, IGNORE_INDEX, sum_token_nll
from .protocols import PerplexityProtocol, Window, get_protocol, plan_windows

__all__ = ["PerplexityResult", "perplexity", "perplexity_windows", "token_streams"]


@dataclass
class PerplexityResult:
    """A perplexity and everything needed to reproduce it (``to_json`` records the protocol)."""

    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # scored tokens
    windows: int
    seqlen: int
    seconds: float
    protocol: PerplexityProtocol | None = None
    text: str = ""  # what was evaluated (a file list or an embedded text's name)
    documents: int = 0  # token streams: 1 for joined documents
    word_perplexity: float | None = None  # lm-eval's, when every document was scored completely
    bits_per_byte: float | None = None  # lm-eval's, same condition
    chunk_tokens: int | None = None  # None: full logits

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "protocol"}
        out["protocol"] = self.protocol.to_json() if self.protocol is not None else None
        return out


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


def _encode(tokenizer: Any, text: str, add_special_tokens: bool | None) -> list[int]:
    kwargs: dict[str, Any] = {"return_attention_mask": False, "verbose": False}
    if add_special_tokens is not None:
        kwargs["add_special_tokens"] = add_special_tokens
    return list(tokenizer(text, **kwargs)["input_ids"])


def _prefix_id(tokenizer: Any, model: nn.Module | None) -> int:
    """lm-eval's ``prefix_token_id``: BOS, else EOS (of the tokenizer, else of the model's config)."""
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise ValueError("the protocol needs a prefix token, but neither the tokenizer nor the model has a BOS or EOS id")


def token_streams(
    text: str | Sequence[str] | Tensor | Sequence[Tensor],
    protocol: PerplexityProtocol,
    tokenizer: Any = None,
    model: nn.Module | None = None,
    name: str = "text",
) -> list[Tensor]:
    """The 1-D token streams ``protocol`` windows: one for joined documents, one per document otherwise.

    ``text`` is a string, a list of documents, one 1-D tensor of token ids (one stream), or a list of them
    (one stream each, for ``documents="separate"``). The prefix token is added here when the protocol asks.
    """
    if isinstance(text, Tensor):
        streams = [text.reshape(-1).long()]
    elif isinstance(text, Sequence) and not isinstance(text, str) and text and all(isinstance(t, Tensor) for t in text):
        if protocol.documents == "joined":
            raise ValueError("token tensors per document need a protocol with documents='separate'")
        streams = [t.reshape(-1).long() for t in text]  # type: ignore[union-attr]
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to evaluate on text")
        docs = [text] if isinstance(text, str) else [str(d) for d in text]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise ValueError(f"{name} is empty")
        if protocol.documents == "joined":
            docs = [protocol.separator.join(docs)]
        streams = [torch.tensor(_encode(tokenizer, d, protocol.add_special_tokens), dtype=torch.long) for d in docs]
    if protocol.prefix_token:
        prefix = torch.tensor([_prefix_id(tokenizer, model)], dtype=torch.long)
        streams = [torch.cat([prefix, s]) for s in streams]
    if sum(s.numel() for s in streams) == 0:
        raise ValueError(f"{name} produced no tokens")
    return streams


def _batch(
    streams: Sequence[Tensor], windows: Sequence[tuple[int, Window]], pad_id: int
) -> tuple[Tensor, Tensor]:
    """Right-padded ``input_ids`` and shifted ``labels`` (``IGNORE_INDEX`` where nothing is scored)."""
    width = max(w.end - w.begin for _, w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (k, w) in enumerate(windows):
        s = streams[k]
        ids[row, : w.end - w.begin] = s[w.begin : w.end]
        # the logits at stream position p score the token at p + 1
        labels[row, w.target_begin - 1 - w.begin : w.target_end - 1 - w.begin] = s[w.target_begin : w.target_end]
    return ids, labels


def _summed_nll(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    n_batches: int,
    chunk_tokens: int | None,
    chunk_vocab: int,
    progress: bool,
) -> tuple[float, int]:
    """Summed NLL and scored positions over ``(input_ids, labels)`` batches, the model in eval mode meanwhile."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    try:
        for ids, labels in tqdm(batches, total=n_batches, desc="perplexity", disable=not progress, leave=False):
            nll, n = sum_token_nll(model, ids.to(device), labels.to(device), chunk_tokens, chunk_vocab)
            total_nll += nll
            count += n
    finally:
        model.train(was_training)
    return total_nll, count


def _word_and_byte_measures(text: str | Sequence[str], total_nll: float) -> tuple[float, float]:
    """lm-eval's word_perplexity and bits_per_byte: the same summed log-likelihood over words / UTF-8 bytes."""
    docs = [text] if isinstance(text, str) else [d for d in text if d.strip()]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return math.exp(total_nll / words), total_nll / nbytes / math.log(2)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    text: str | Sequence[str] | Tensor | Sequence[Tensor],
    tokenizer: Any = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
    name: str = "evaluation text",
    protocol: str | PerplexityProtocol = "armor",
    stride: int | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string, a list of documents, or 1-D token ids) under ``protocol``.

    ``protocol`` is a preset name (``"armor"``, ``"lm-eval-rolling"``, ``"strided"``; see
    :mod:`armor.eval.protocols`) or a :class:`PerplexityProtocol`; ``seqlen``/``stride`` override the preset's
    (``seqlen`` defaults to 512). ``max_windows`` keeps the first windows in text order. ``chunk_tokens=None``
    computes the full logits of each batch (memory grows with the vocabulary), otherwise the NLL is computed in
    chunks (same value to float tolerance).
    """
    start = time.perf_counter()
    proto = get_protocol(protocol, seqlen=seqlen, stride=stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    streams = token_streams(text, proto, tokenizer, model, name)
    for stream in streams:
        check_token_ids(stream, model, name)
    planned = [(k, w) for k, s in enumerate(streams) for w in plan_windows(s.numel(), proto)]
    if not planned:
        total = sum(s.numel() for s in streams)
        raise ValueError(f"seqlen {proto.seqlen} is larger than the {name} ({total} tokens)")
    complete = max_windows is None or max_windows >= len(planned)
    planned = planned[:max_windows]
    # Disjoint windows are batched in text order (armor.pipeline.evaluate relies on it); windows of varying
    # length go longest first, so batches waste little padding (the sums do not depend on the order).
    order = planned if proto.windowing == "disjoint" else sorted(planned, key=lambda kw: -(kw[1].end - kw[1].begin))
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else 0
    starts = range(0, len(order), batch_size)
    batches = (_batch(streams, order[s : s + batch_size], pad_id) for s in starts)  # built one at a time
    total_nll, count = _summed_nll(model, batches, len(starts), chunk_tokens, chunk_vocab, progress)
    if count == 0:
        raise ValueError(f"no token of the {name} is scored under protocol {proto.name!r}")
    mean = total_nll / count
    word_ppl = bpb = None
    docs_text = None if isinstance(text, Tensor) or (text and isinstance(text[0], Tensor)) else text
    lm_eval_like = proto.documents == "separate" and proto.prefix_token and proto.windowing == "rolling"
    if complete and docs_text is not None and lm_eval_like:
        word_ppl, bpb = _word_and_byte_measures(docs_text, total_nll)  # type: ignore[arg-type]
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=len(planned),
        seqlen=proto.seqlen,
        seconds=time.perf_counter() - start,
        protocol=proto,
        text=name,
        documents=len(streams),
        word_perplexity=word_ppl,
        bits_per_byte=bpb,
        chunk_tokens=chunk_tokens,
    )
