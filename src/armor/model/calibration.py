"""Calibration data and the one forward pass that collects every selected layer's input statistics.

Documents are joined with blank lines, tokenised once and cut into ``nsamples`` sequences of ``seqlen`` tokens
(ALGORITHM.md §1).  Forward hooks feed each layer's input into a float32
:class:`~armor.stats.StatsAccumulator` batch by batch, so memory is bounded by one batch of activations plus
the statistics themselves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..stats import LayerStats, StatsAccumulator
from .layers import find_decoder_layers

__all__ = [
    "DOC_SEPARATOR",
    "read_documents",
    "dataset_documents",
    "tokenize_documents",
    "calibration_sequences",
    "collect_stats",
    "model_device",
]

log = logging.getLogger(__name__)

#: How documents are joined before tokenisation (the perplexity protocol of ALGORITHM.md §9 uses blank lines).
DOC_SEPARATOR = "\n\n"


def read_documents(path: str | Path) -> list[str]:
    """Documents of a local text file.

    ``.cor``/``.lines`` files hold one document per line, ``.jsonl`` one JSON object with a ``"text"`` field
    per
    line; any other file is one document.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix in (".cor", ".lines"):
        docs = [line.strip() for line in raw.splitlines()]
    elif p.suffix == ".jsonl":
        docs = []
        for k, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{p}:{k}: expected a JSON object with a 'text' field ({exc})") from None
    else:
        docs = [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"text file is empty: {p}")
    return docs


def dataset_documents(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None, limit: int = 20000
) -> list[str]:
    """Documents of a Hugging Face ``datasets`` data set (a name, a saved folder or a local data file)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("--calib-dataset needs the 'datasets' package: pip install datasets") from None
    p = Path(name)
    if p.is_dir():  # written by Dataset(Dict).save_to_disk
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    elif p.is_file():
        kind = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
            p.suffix, "text"
        )
        ds = datasets.load_dataset(kind, data_files=str(p), split=split)
    else:
        ds = datasets.load_dataset(name, config, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"data set {name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    docs = [str(t) for t in ds.select(range(min(limit, len(ds))))[text_field] if t and str(t).strip()]
    if not docs:
        raise ValueError(f"data set {name!r} split {split!r} has no non-empty {text_field!r} entries")
    return docs


def tokenize_documents(tokenizer: Any, documents: Sequence[str], name: str = "text") -> Tensor:
    """Token ids (1-D long tensor) of the documents joined with :data:`DOC_SEPARATOR`, tokenised once."""
    text = DOC_SEPARATOR.join(d for d in documents if d.strip())
    if not text.strip():
        raise ValueError(f"{name} is empty")
    # Long inputs are the point here; silence the "longer than model_max_length" warning by tokenising
    # directly.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if not ids:
        raise ValueError(f"{name} produced no tokens")
    return torch.tensor(ids, dtype=torch.long)


def calibration_sequences(
    tokens: Tensor, nsamples: int, seqlen: int, seed: int = 0, name: str = "calibration text"
) -> Tensor:
    """``(nsamples, seqlen)`` token ids: non-overlapping windows of the token stream.

    When the text holds more windows than needed, ``nsamples`` of them are drawn at random (``seed``) so the
    calibration covers the whole text rather than its beginning.
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    total = tokens.numel()
    if seqlen > total:
        raise ValueError(f"seqlen {seqlen} is larger than the {name} ({total} tokens)")
    windows = total // seqlen
    if nsamples > windows:
        raise ValueError(
            f"{name} has {total} tokens, enough for {windows} sequences of {seqlen}, "
            f"but nsamples={nsamples}; "
            "lower --nsamples/--seqlen or add text"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=gen)[:nsamples].sort().values
    return tokens[: windows * seqlen].reshape(windows, seqlen)[pick].clone()


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (where inputs must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _StopForward(Exception):
    """Raised after the last block that holds a selected layer: the rest of the model is not needed."""


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    input_ids: Tensor,
    batch_size: int = 8,
    full: bool | set[str] = False,
    share_inputs: bool = True,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """One forward pass of the (dense) model over ``input_ids`` ``(N, seqlen)``; statistics per selected
    layer.

    Args:
        layers: name -> linear layer, as from :func:`~armor.model.layers.find_prunable_layers`.
        full: also accumulate the full ``(2/N) X^T X`` (SparseGPT); ``True`` for all layers or a set of names.
        share_inputs: layers called one after another on the very same tensor (q/k/v, gate/up) share one
            accumulator, which saves their repeated work; their statistics are identical anyway.
    """
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (nsamples, seqlen) tensor, got {tuple(input_ids.shape)}")
    device = model_device(model)
    needs_full = {n for n in layers if (full is True or (isinstance(full, set) and n in full))}
    accs: dict[str, StatsAccumulator] = {}
    owner: dict[str, str] = {}  # layer -> layer whose accumulator it shares
    state: dict[str, Any] = {"last_x": None, "last_name": None, "first": True}

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0]
            prev = state["last_name"]
            same = share_inputs and x is state["last_x"] and prev is not None
            if state["first"]:
                if same and (name in needs_full) == (owner[prev] in needs_full):
                    owner[name] = owner[prev]
                else:
                    owner[name] = name
                    accs[name] = StatsAccumulator(mod.in_features, full=name in needs_full, device=x.device)
            elif (owner[name] != name) != bool(same and owner[prev] == owner[name]):
                raise RuntimeError(
                    f"layer {name}: inputs shared with {owner[name]} in the first batch but not later; "
                    "collect statistics with share_inputs=False"
                )
            if owner[name] == name:
                accs[name].update(x)
            state["last_x"], state["last_name"] = x, name

        return hook

    _, blocks = find_decoder_layers(model)
    # Stop after the last block that holds a selected layer; for the usual "all layers" that is the final
    # block, which still saves the final norm and the lm_head (the largest matmul of a small model).
    block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    last_block = max(block_of.get(id(m), len(blocks) - 1) for m in layers.values())

    def stop(*_: Any) -> None:
        raise _StopForward

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in layers.items()]
    handles.append(blocks[last_block].register_forward_hook(stop))
    from tqdm.auto import tqdm

    try:
        starts = range(0, input_ids.shape[0], batch_size)
        for s in tqdm(starts, desc="calibration", unit="batch", disable=not progress, leave=False):
            batch = input_ids[s : s + batch_size].to(device)
            state["last_x"], state["last_name"] = None, None
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            state["first"] = False
    finally:
        for h in handles:
            h.remove()
        state["last_x"] = None
    missing = [n for n in layers if n not in owner]
    if missing:
        raise RuntimeError(f"layers never called during the forward pass: {', '.join(missing[:5])}")
    finals = {n: acc.finalize() for n, acc in accs.items()}
    return {n: finals[owner[n]] for n in layers}
