"""``armor eval``: perplexity under a named protocol, and zero-shot accuracy through lm-eval, of a model folder.

``armor prune`` shares the options (:func:`add_perplexity_args`, :func:`add_task_args`: ``--eval-text``,
``--eval-seqlen``, ``--eval-windows``, ``--eval-batch-size``, ``--protocol``, ``--stride``, ``--chunk-tokens``,
``--full-logits``, ``--tasks``, ``--tasks-include``, ``--limit``) and the evaluation itself: :func:`evaluate` takes
an :class:`EvalSettings`, built from either command's arguments by :meth:`EvalSettings.from_args`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..eval import DEFAULT_CHUNK_TOKENS, PROTOCOLS, get_protocol, perplexity
from ..eval.lm_eval_adapter import lm_eval_version, run_lm_eval, unknown_tasks
from ..eval.local_tasks import SHIPPED_TASKS
from ..models import position_limit
from ..storage import load_model, load_tokenizer
from ..storage.reader import read_config_json
from .common import (
    DEFAULT_EVAL_TEXT,
    DEFAULTS_NOTE,
    CliError,
    HelpFormatter,
    add_device_args,
    check_device,
    check_positive,
    check_writable_file,
    command_line,
    documents,
    model_folder,
    split_list,
)

__all__ = ["register", "run", "add_perplexity_args", "add_task_args", "EvalSettings", "evaluate"]


def add_perplexity_args(p: argparse.ArgumentParser, in_prune: bool = False) -> None:
    """The perplexity options, stored as ``args.eval_text``, ``eval_seqlen``, ``eval_windows``,
    ``eval_batch_size``, ``protocol``, ``stride``, ``chunk_tokens``, ``full_logits``.

    One spelling in both commands: ``--eval-text``, ``--eval-seqlen``, ``--eval-windows``, ``--eval-batch-size``
    (``armor prune``'s own ``--seqlen``/``--batch-size`` are the calibration's).  ``in_prune`` only changes the
    default number of windows (20 there, all here).
    """
    d = EvalSettings()  # the defaults, stated once
    g = p.add_argument_group("perplexity")
    g.add_argument("--eval-text", dest="eval_text", nargs="+", default=None, metavar="FILE",
                   help="evaluation text files (.txt whole, .cor/.lines one document per line, .jsonl with 'text'); "
                   "default: the embedded Lee news corpus (one article per line)")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default=d.protocol,
                   help="armor: documents joined, non-overlapping windows (SparseGPT/Wanda/ARMOR scripts); "
                   "lm-eval-rolling: lm-eval's rolling windows per document; strided: HF's sliding windows")
    g.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=d.seqlen,
                   help="tokens per window (lm-eval's max_length for rolling)")
    g.add_argument("--stride", type=int, default=None,
                   help="strided protocol: tokens between window starts (default: seqlen / 2)")
    g.add_argument("--eval-windows", dest="eval_windows", type=int,
                   default=20 if in_prune else None,
                   help="at most this many windows, the first in text order" + ("" if in_prune else " (default: all)"))
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=d.batch_size,
                   help="windows (and lm-eval requests) per forward")
    g.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens,
                   help="positions per output-head chunk: bounds the logits held at once")
    g.add_argument("--full-logits", action="store_true",
                   help="compute each batch's full-vocabulary logits instead (more memory, same value)")


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The lm-eval options (``armor eval`` and ``armor prune`` use the same names)."""
    g = p.add_argument_group("zero-shot tasks (lm-eval, offline: pip install 'armor-prune[eval]')")
    g.add_argument("--tasks", default=None, metavar="TASK,...",
                   help=f"comma-separated: shipped tasks ({', '.join(SHIPPED_TASKS)}), multiple-choice .jsonl "
                   "files ({\"context\", \"choices\", \"label\"} per line), task .yaml files, or lm-eval task names")
    g.add_argument("--tasks-include", default=None, metavar="DIR", help="folder of extra lm-eval task YAMLs")
    g.add_argument("--limit", type=float, default=None,
                   help="at most this many examples per task (a fraction of each task when < 1)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity (named protocols) and zero-shot accuracy (lm-eval) of a dense or pruned model folder",
        description="Perplexity of a dense or pruned model folder under a named protocol, and zero-shot accuracy "
        "through lm-eval on local tasks. Every result records the protocol that produced it. " + DEFAULTS_NOTE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded SmolLM2)")
    add_perplexity_args(p)
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    add_task_args(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    add_device_args(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how: perplexity under a protocol, lm-eval tasks, or both (one field per option)."""

    text: tuple[str, ...] = ()  # evaluation text files; empty: the embedded Lee corpus
    perplexity: bool = True
    protocol: str = "armor"
    seqlen: int = 512
    max_windows: int | None = None
    batch_size: int = 4
    stride: int | None = None
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS  # None: full-vocabulary logits per batch
    tasks: tuple[str, ...] = ()
    tasks_include: str | None = None
    limit: float | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace, perplexity: bool = True, progress: bool = True) -> EvalSettings:
        """The settings of :func:`add_perplexity_args` and :func:`add_task_args` options, checked: a one-line
        :class:`CliError` for a bad value or a missing file (before anything is loaded)."""
        out = cls(
            text=tuple(args.eval_text or ()), perplexity=perplexity, protocol=args.protocol, seqlen=args.eval_seqlen,
            max_windows=args.eval_windows, batch_size=args.eval_batch_size, stride=args.stride,
            chunk_tokens=None if args.full_logits else args.chunk_tokens, tasks=tuple(split_list(args.tasks)),
            tasks_include=args.tasks_include, limit=args.limit, progress=progress,
        )
        if args.tasks is not None and args.tasks.strip().lower() not in ("", "none") and not out.tasks:
            raise CliError(f"--tasks {args.tasks!r} names no task (comma-separated names or files)")
        out._check(args.chunk_tokens)
        return out

    def _check(self, chunk_tokens: int | None) -> None:
        for flag, value in (("--eval-seqlen", self.seqlen), ("--eval-windows", self.max_windows),
                            ("--eval-batch-size", self.batch_size), ("--chunk-tokens", chunk_tokens),
                            ("--stride", self.stride), ("--limit", self.limit)):
            check_positive(flag, value)
        try:
            get_protocol(self.protocol, seqlen=self.seqlen, stride=self.stride)
        except ValueError as exc:
            raise CliError(f"--protocol {self.protocol}: {exc}") from None
        for f in self.text:
            if not Path(f).is_file():
                raise CliError(f"text file not found: {f}")
        if self.tasks_include is not None and not Path(self.tasks_include).is_dir():
            raise CliError(f"--tasks-include: not a folder: {self.tasks_include}")
        for task in self.tasks:
            if Path(task).suffix in (".jsonl", ".yaml", ".yml") and not Path(task).is_file():
                raise CliError(f"task file not found: {task}")
        if self.tasks and lm_eval_version() is None:
            raise CliError("--tasks needs lm-eval: pip install 'armor-prune[eval]' (or pip install lm-eval)")
        bad = unknown_tasks(self.tasks, self.tasks_include) if self.tasks else []
        if bad:  # before the model is loaded and its perplexity computed
            raise CliError(f"--tasks: no task named {', '.join(bad)} (shipped: {', '.join(SHIPPED_TASKS)}; or a "
                           ".jsonl/.yaml task file, or a task lm-eval knows)")


def _perplexity(model: nn.Module, tokenizer: Any, settings: EvalSettings, prefix: str) -> dict[str, Any]:
    docs, src = documents(settings.text, DEFAULT_EVAL_TEXT, "evaluation text")
    res = perplexity(
        model, docs, tokenizer, seqlen=settings.seqlen, max_windows=settings.max_windows,
        batch_size=settings.batch_size, progress=settings.progress, name=src, protocol=settings.protocol,
        stride=settings.stride, chunk_tokens=settings.chunk_tokens,
    )
    extra = f", word ppl {res.word_perplexity:.3f}" if res.word_perplexity is not None else ""
    print(
        f"{prefix}perplexity on {src} ({res.protocol.name if res.protocol else settings.protocol} protocol): "
        f"{res.ppl:.3f}{extra}  [{res.windows} windows of <= {res.seqlen}, {res.tokens} tokens scored, "
        f"{res.seconds:.1f} s]",
        flush=True,
    )
    return res.to_json()


def _tasks(model: nn.Module, tokenizer: Any, settings: EvalSettings, prefix: str) -> dict[str, Any]:
    limit = settings.limit
    scores = run_lm_eval(
        model, list(settings.tasks), tokenizer, batch_size=settings.batch_size,
        limit=None if limit is None else (int(limit) if limit >= 1 else limit), include_path=settings.tasks_include,
    )
    for task, metrics in scores.items():
        shown = ", ".join(
            f"{m} {v:.3f}" + (f" ± {metrics[m + '_stderr']:.3f}" if isinstance(metrics.get(m + "_stderr"), float)
                              else "")
            for m, v in metrics.items()
            if isinstance(v, float) and not m.endswith("_stderr")
        )
        print(f"{prefix}{task}: {shown}  [{metrics.get('samples', '?')} examples]", flush=True)
    return scores


def evaluate(model: nn.Module, tokenizer: Any, settings: EvalSettings, label: str = "") -> dict[str, Any]:
    """Perplexity (when ``settings.perplexity``) and lm-eval accuracies (for ``settings.tasks``) of a loaded
    model; prints one line per result and returns them as ``{"perplexity": {...}, "tasks": {...}}``."""
    out: dict[str, Any] = {}
    prefix = f"  [{label}] " if label else ""
    if settings.perplexity:
        out["perplexity"] = _perplexity(model, tokenizer, settings, prefix)
    if settings.tasks:
        out["tasks"] = _tasks(model, tokenizer, settings, prefix)
        out["lm_eval_version"] = lm_eval_version()
    return out


def run(args: argparse.Namespace) -> int:
    if args.no_ppl and not split_list(args.tasks):
        raise CliError("nothing to evaluate: --no-ppl and no --tasks")
    settings = EvalSettings.from_args(args, perplexity=not args.no_ppl)
    check_writable_file("--json", args.json)
    path = model_folder(args.model)
    limit = position_limit(read_config_json(path) or {})
    if settings.perplexity and limit is not None and settings.seqlen > limit:
        raise CliError(f"--eval-seqlen {settings.seqlen} is longer than the model's max_position_embeddings ({limit})")
    device = check_device(args.device)
    tokenizer = load_tokenizer(path)
    model = load_model(path, args.dtype, device)
    out: dict[str, Any] = {"model": str(path), "command": command_line()}
    out.update(evaluate(model, tokenizer, settings))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0
