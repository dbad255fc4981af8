"""Text for calibration and evaluation: documents from files or data sets, tokenised once, cut into windows.

Documents are joined with blank lines, tokenised once and cut into ``nsamples`` sequences of ``seqlen`` tokens
(docs/algorithm.md §1).  No model knowledge lives here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DOC_SEPARATOR",
    "read_documents",
    "dataset_documents",
    "tokenize_documents",
    "calibration_sequences",
    "calibration_ids",
]

log = logging.getLogger(__name__)

#: How documents are joined before tokenisation (the perplexity protocol of docs/algorithm.md §9 uses blank lines).
DOC_SEPARATOR = "\n\n"


#: Share of a text file's bytes that may be invalid UTF-8 (replaced, with a warning) before it is refused.
MAX_BAD_BYTES = 0.001


def _decode_text(p: Path) -> str:
    """The UTF-8 text of ``p``.  A binary file (NUL bytes) or another encoding (more than :data:`MAX_BAD_BYTES`
    of the bytes invalid) is a ValueError naming the file and the first bad byte; a few stray bytes (a corpus
    with one Latin-1 pound sign) are replaced by U+FFFD with a warning that says how many."""
    data = p.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{p} holds NUL bytes (first at byte {data.index(0)}): a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        first = exc.start
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_BAD_BYTES * len(data):
        raise ValueError(
            f"{p} is not UTF-8 text ({bad} invalid sequences, the first at byte {first}: "
            f"{data[first:first + 1]!r}); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )
    log.warning("%s: %d byte sequence(s) are not UTF-8 (the first at byte %d); replaced by U+FFFD", p, bad, first)
    return text


def _jsonl_text(path: Path, line_no: int, line: str) -> str | None:
    """The ``"text"`` string of one ``.jsonl`` line; None for a blank line or a null text (skipped, as data-set
    dumps hold them); a ValueError naming the file and line for anything else (a number, list or object would
    otherwise become its Python repr, calibrated on in silence)."""
    if not line.strip():
        return None
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' field ({exc})") from None
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: the 'text' field is a {type(text).__name__}, not a string")
    return text


def read_documents(path: str | Path) -> list[str]:
    """Documents of a local text file.

    ``.cor``/``.lines`` files hold one document per line, ``.jsonl`` one JSON object with a ``"text"`` field
    per line; any other file is one document.  The file must be UTF-8 text (see :func:`_decode_text`).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    raw = _decode_text(p)
    if p.suffix in (".cor", ".lines"):
        docs = [line.strip() for line in raw.splitlines()]
    elif p.suffix == ".jsonl":
        docs = [text for k, line in enumerate(raw.splitlines(), 1) if (text := _jsonl_text(p, k, line))]
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
        raise ImportError("--calib-dataset needs the 'datasets' package: pip install 'armor-prune[datasets]'") from None
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


def calibration_ids(
    tokenizer: Any,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    name: str = "calibration text",
) -> Tensor:
    """``(nsamples, seqlen)`` calibration token ids from documents (joined, tokenised once, cut)."""
    return calibration_sequences(tokenize_documents(tokenizer, documents, name=name), nsamples, seqlen, seed, name)
