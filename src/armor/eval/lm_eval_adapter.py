"""Optional bridge to EleutherAI's lm-evaluation-harness (``pip install armor-prune[eval]``).

lm-eval's built-in tasks download their data, so offline only custom tasks over local files work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["lm_eval_model", "run_lm_eval"]


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError(
            "lm-eval is not installed: pip install 'armor-prune[eval]' (or pip install lm-eval)"
        ) from None
    return lm_eval, HFLM


def lm_eval_model(
    model: nn.Module | str | Path, tokenizer: Any = None, batch_size: int | str = 1, **kwargs: Any
) -> Any:
    """Wrap a (pruned) model, or a model folder, in lm-eval's ``HFLM``."""
    _, hflm = _import_lm_eval()
    if isinstance(model, (str, Path)):
        from ..model.io import load_model, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_model(model)
    if tokenizer is None:
        raise ValueError("lm_eval_model needs the tokenizer when given a model object")
    return hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def run_lm_eval(
    model: nn.Module | str | Path,
    tasks: Sequence[str],
    tokenizer: Any = None,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on ``tasks``; ``include_path`` is a folder of custom task YAMLs."""
    lm_eval, _ = _import_lm_eval()
    lm = lm_eval_model(model, tokenizer, batch_size=batch_size)
    task_manager = None
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=str(include_path))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=task_manager, **kwargs)
    return {} if out is None else out.get("results", {})
