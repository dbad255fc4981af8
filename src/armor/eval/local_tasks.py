"""Zero-shot tasks over local files for lm-eval (no download): the shipped example, and a user's own JSONL.

A multiple-choice JSONL holds one item per line::

    {"context": "The first sentence.", "choices": ["a continuation", "another", ...], "label": 2}

``label`` is the index of the right choice. :func:`task_config` turns such a file (or a task YAML whose
``dataset_kwargs.data_files`` are relative to the YAML's folder) into the task dict lm-eval takes, with
absolute paths, so a task works from any working directory.

The shipped task ``britannica_completion`` ("how does this sentence end?") is built by
:func:`sentence_completion_items` from the Encyclopaedia Britannica 11th edition (1911) article on Shakespeare, the
embedded text ``armor.data.default_text_path("britannica")``; the JSONL in ``tasks/`` is its output with the
defaults, and a test checks that it still is.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "TASKS_DIR",
    "SHIPPED_TASKS",
    "MC_TEMPLATE",
    "sentence_completion_items",
    "paragraph_sentences",
    "read_items",
    "task_config",
    "write_items",
]

#: Folder of the shipped task definitions.
TASKS_DIR = Path(__file__).parent / "tasks"
#: Shipped tasks: name -> YAML.
SHIPPED_TASKS: dict[str, Path] = {
    "britannica_completion": TASKS_DIR / "britannica_completion" / "britannica_completion.yaml"
}
#: The YAML a bare multiple-choice JSONL is evaluated with (its ``task`` and ``data_files`` are replaced).
MC_TEMPLATE = SHIPPED_TASKS["britannica_completion"]

_ABBREVIATION = re.compile(r"(?:\b[A-Z][a-z]{0,2}|\b[A-Z]|\bi\.e|\be\.g|\bviz|\bcf|\bvol|\bed|\bp|\bpp|\bch)\.$")


def paragraph_sentences(text: str) -> list[list[str]]:
    """Sentences of each prose paragraph of ``text`` (markup, headings and footnotes dropped)."""
    paragraphs: list[list[str]] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith("#") and not re.fullmatch(r"p\.\d+:\d+", ln)]
        if not lines or lines[0].startswith(("[", "|")):
            continue  # headings "[Marriage]", footnotes "[^1]: ...", tables
        prose = re.sub(r"\s+", " ", " ".join(lines)).replace("--", "-")
        sentences: list[str] = []
        current = ""
        for piece in re.split(r"(?<=[.!?])\s+", prose):
            current = f"{current} {piece}".strip()
            # a split after "St." or "J." is not a sentence end; nor is one before a lower-case word
            if _ABBREVIATION.search(current) or not piece:
                continue
            sentences.append(current)
            current = ""
        if current:
            sentences.append(current)
        merged: list[str] = []
        for s in sentences:
            if merged and not s[0].isupper() and s[0] not in "\"'(":
                merged[-1] = f"{merged[-1]} {s}"
            else:
                merged.append(s)
        paragraphs.append(merged)
    return paragraphs


def _usable(sentence: str) -> bool:
    """Clean prose only: OCR debris (page headers, split words, stray letters) makes items unanswerable."""
    words = sentence.split()
    if not 6 <= len(words) <= 40 or sentence[-1] not in ".!?" or not sentence[0].isupper():
        return False
    if re.search(r"[\[\]{}|_*&·]|\s[,.;:]|\w- \w|\d\s\d|[A-Za-z]\d|\d[A-Za-z]", sentence):
        return False
    stray = sum(1 for w in words if len(w.strip("\"'(),.;:!?")) == 1 and w.strip("\"'(),.;:!?") not in "aAI")
    shouting = any(len(w) >= 3 and w.isupper() for w in words)
    odd_case = any(re.search(r"[a-z][A-Z]|^[A-Z]{2}[a-z]", w) for w in words)
    return stray == 0 and not shouting and not odd_case


def sentence_completion_items(
    text: str, n_items: int = 80, n_choices: int = 4, seed: int = 0
) -> list[dict[str, Any]]:
    """Deterministic "how does this sentence end?" items (HellaSwag-like, from prose).

    ``context`` is the first half of a sentence (split at the middle word), the right choice its second half, the
    distractors second halves of sentences of other paragraphs; the choices are shuffled. Same text and arguments,
    same items (``random.Random(seed)``).
    """
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    paragraphs = paragraph_sentences(text)
    halves = [
        (p, " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :]))
        for p, sents in enumerate(paragraphs)
        for s in sents
        if _usable(s) and len(words := s.split()) >= 10
    ]
    if len(halves) < max(n_items, n_choices):
        raise ValueError(f"the text has {len(halves)} usable sentences, fewer than n_items={n_items}")
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(halves)), n_items))
    items = []
    for k in picked:
        p, context, answer = halves[k]
        others = sorted({end for q, _, end in halves if q != p and end != answer})
        if len(others) < n_choices - 1:
            raise ValueError(f"the text has too few distinct sentence endings for {n_choices} choices")
        choices = [answer, *rng.sample(others, n_choices - 1)]
        rng.shuffle(choices)
        items.append({"id": len(items), "context": context, "choices": choices, "label": choices.index(answer)})
    return items


def write_items(items: list[dict[str, Any]], path: str | Path) -> Path:
    """Write items as JSONL (one object per line, UTF-8, stable key order)."""
    p = Path(path)
    p.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return p


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """Items of a multiple-choice JSONL, checked: a clear error names the first bad line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file not found: {p}")
    items = []
    for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{p}:{k}: not JSON ({exc})") from None
        choices, label = item.get("choices") if isinstance(item, dict) else None, None
        if isinstance(item, dict):
            label = item.get("label")
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("context"), str)
            or not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) for c in choices)
            or not isinstance(label, int)
            or isinstance(label, bool)  # JSON true/false are not indices (Python takes them for 1/0)
            or not 0 <= label < len(choices)
        ):
            raise ValueError(
                f"{p}:{k}: expected {{\"context\": str, \"choices\": [str, str, ...], \"label\": index of the right "
                "choice}"
            )
        items.append(item)
    if not items:
        raise ValueError(f"task file has no items: {p}")
    return items


def task_config(source: str | Path) -> dict[str, Any]:
    """lm-eval task dict for a shipped task name, a task YAML, or a multiple-choice JSONL.

    Relative ``data_files`` of a YAML are resolved against the YAML's folder (lm-eval would resolve them against
    the working directory). A JSONL is checked with :func:`read_items` and evaluated with :data:`MC_TEMPLATE`
    under the task name of its file stem.
    """
    if str(source) in SHIPPED_TASKS:
        return task_config(SHIPPED_TASKS[str(source)])
    path = Path(source)
    if path.suffix == ".jsonl":
        read_items(path)
        config = _load_yaml(MC_TEMPLATE)
        config["task"] = re.sub(r"\W+", "_", path.stem)
        config["dataset_kwargs"] = {"data_files": {config["test_split"]: str(path.resolve())}}
        return config
    if path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"not a task: {source} (expected a shipped task name, a .yaml or a .jsonl)")
    config = _load_yaml(path)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {
            split: _resolve(path.parent, f) for split, f in files.items()
        }
    elif files is not None:
        config["dataset_kwargs"]["data_files"] = _resolve(path.parent, files)
    return config


def _resolve(folder: Path, files: str | list[str]) -> str | list[str]:
    if isinstance(files, list):
        return [str((folder / f).resolve()) for f in files]
    return str((folder / files).resolve())


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(
            f"{path}: not a plain YAML task ({exc}); tasks using lm-eval's !function tags go in --tasks-include"
        ) from None
    if not isinstance(config, dict) or "task" not in config:
        raise ValueError(f"{path}: a task YAML needs at least a 'task' name")
    return config
