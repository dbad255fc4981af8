"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (``pip install 'armor-prune[eval]'``), offline.

The model object is wrapped as it is in lm-eval's Hugging Face backend (``HFLM``): a pruned model keeps its
packed ARMOR/2:4 modules, nothing is reconstructed densely. lm-eval's built-in tasks download their data, so
offline only tasks over local files work: the shipped ``britannica_completion``, a multiple-choice JSONL of
one's own, a task YAML, or any task in a ``--tasks-include`` folder (see :mod:`armor.eval.local_tasks`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..storage import load_model, load_tokenizer
from .local_tasks import SHIPPED_TASKS, task_config

__all__ = ["lm_eval_model", "lm_eval_version", "run_lm_eval", "task_specs", "unknown_tasks"]


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError(
            "lm-eval is not installed: pip install 'armor-prune[eval]' (or pip install lm-eval)"
        ) from None
    return lm_eval, HFLM


def lm_eval_version() -> str | None:
    """The installed lm-eval's version, or ``None``."""
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed or broken metadata: both mean "not usable"
        return None


def lm_eval_model(
    model: nn.Module | str | Path,
    tokenizer: Any = None,
    batch_size: int | str = 1,
    max_length: int | None = None,
    **kwargs: Any,
) -> Any:
    """Wrap a (pruned) model object, or a model folder, in lm-eval's ``HFLM``."""
    _, hflm = _import_lm_eval()
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_model(model)
    if tokenizer is None:
        raise ValueError("lm_eval_model needs the tokenizer when given a model object")
    # HFLM warns that a model object (rather than a hub name) was passed: that is the point here.
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kwargs)
    finally:
        logger.setLevel(level)


def unknown_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> list[str]:
    """The entries of ``tasks`` that name no task: neither shipped, nor a task file, nor known to lm-eval (with the
    YAMLs of ``include_path``).  lm-eval's task index (seconds to build) is read only when a name needs it."""
    names = [t for t in tasks if t not in SHIPPED_TASKS and Path(t).suffix not in (".jsonl", ".yaml", ".yml")]
    if not names:
        return []
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    index = TaskManager(include_path=str(include_path) if include_path is not None else None, include_defaults=True)
    known = set(index.all_tasks)
    return [t for t in names if t not in known]


def task_specs(tasks: Sequence[str]) -> list[str | dict[str, Any]]:
    """What lm-eval gets for each entry of ``tasks``: a task dict for shipped names and local ``.jsonl``/``.yaml``
    files (paths made absolute), the name itself otherwise (an lm-eval or ``--tasks-include`` task)."""
    specs: list[str | dict[str, Any]] = []
    for t in tasks:
        if t in SHIPPED_TASKS or Path(t).suffix in (".jsonl", ".yaml", ".yml"):
            specs.append(task_config(t))
        else:
            specs.append(t)
    return specs


def _summary(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value}}`` from lm-eval's results (its ``"acc,none"`` keys become ``"acc"``)."""
    summary: dict[str, dict[str, Any]] = {}
    for task, metrics in (out.get("results") or {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len"):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = value
        n = (out.get("n-samples") or {}).get(task)
        if n:
            row["samples"] = n.get("effective", n.get("original"))
        summary[task] = row
    return summary


def run_lm_eval(
    model: nn.Module | str | Path,
    tasks: Sequence[str],
    tokenizer: Any = None,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    max_length: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on ``tasks``; returns ``{task: {metric: value, ..., "samples": n}}``.

    ``tasks`` entries: a shipped task name (``britannica_completion``), a multiple-choice ``.jsonl``, a task
    ``.yaml``, or a task name known to lm-eval (``include_path`` adds a folder of task YAMLs). ``limit`` caps the
    examples per task (an int, or a fraction when < 1). Other keyword arguments go to ``simple_evaluate``.
    """
    lm_eval, _ = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given")
    specs = task_specs(tasks)
    lm = lm_eval_model(model, tokenizer, batch_size=batch_size, max_length=max_length)
    # Indexing lm-eval's thousands of built-in task YAMLs takes seconds; only names can need them.
    task_manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=any(isinstance(spec, str) for spec in specs),
    )
    # lm-eval logs every request at INFO; keep a run's output readable.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=specs, limit=limit, task_manager=task_manager, log_samples=False, **kwargs
    )
    if out is None:  # non-zero ranks in a distributed run
        return {}
    return _summary(out)
