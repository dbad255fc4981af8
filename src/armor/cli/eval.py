"""``armor eval``: perplexity under a named protocol, and zero-shot accuracy through lm-eval, of a model folder.

The options are shared with ``armor prune`` through :func:`add_perplexity_args`, :func:`add_task_args` and
:func:`evaluate`: ``--text``, ``--seqlen``, ``--max-windows``, ``--batch-size`` (also spelled ``--eval-text``,
``--eval-seqlen``, ``--eval-windows``, ``--eval-batch-size``, the only spellings in ``armor prune``, where the
plain ones are the calibration's), ``--protocol``, ``--stride``, ``--chunk-tokens``, ``--full-logits``,
``--tasks``, ``--tasks-include``, ``--limit``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..eval import DEFAULT_CHUNK_TOKENS, PROTOCOLS, get_protocol, perplexity
from ..eval.lm_eval_adapter import lm_eval_version, run_lm_eval
from ..eval.local_tasks import SHIPPED_TASKS
from ..storage import load_model, load_tokenizer
from .common import (
    DEFAULT_EVAL_TEXT,
    CliError,
    HelpFormatter,
    add_device_args,
    check_device,
    check_positive,
    command_line,
    documents,
    model_folder,
    split_list,
)

__all__ = ["register", "run", "add_perplexity_args", "add_task_args", "check_eval_args", "evaluate"]


def add_perplexity_args(p: argparse.ArgumentParser, in_prune: bool = False) -> None:
    """The perplexity options, stored as ``args.eval_text``, ``eval_seqlen``, ``eval_windows``,
    ``eval_batch_size``, ``protocol``, ``stride``, ``chunk_tokens``, ``full_logits``.

    One spelling in both commands: ``--eval-text``, ``--eval-seqlen``, ``--eval-windows``, ``--eval-batch-size``
    (``armor prune``'s own ``--seqlen``/``--batch-size`` are the calibration's).  ``in_prune`` only changes the
    default number of windows (20 there, all here).
    """
    def names(plain: str, prefixed: str) -> list[str]:
        return [prefixed]

    g = p.add_argument_group("perplexity")
    g.add_argument(*names("--text", "--eval-text"), dest="eval_text", nargs="+", default=None, metavar="FILE",
                   help="evaluation text files (.txt whole, .cor/.lines one document per line, .jsonl with 'text'); "
                   "default: the embedded Lee news corpus (one article per line)")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="armor",
                   help="armor: documents joined, non-overlapping windows (SparseGPT/Wanda/ARMOR scripts); "
                   "lm-eval-rolling: lm-eval's rolling windows per document; strided: HF's sliding windows")
    g.add_argument(*names("--seqlen", "--eval-seqlen"), dest="eval_seqlen", type=int, default=512,
                   help="tokens per window (lm-eval's max_length for rolling)")
    g.add_argument("--stride", type=int, default=None,
                   help="strided protocol: tokens between window starts (default: seqlen / 2)")
    g.add_argument(*names("--max-windows", "--eval-windows"), dest="eval_windows", type=int,
                   default=20 if in_prune else None,
                   help="at most this many windows, the first in text order" + ("" if in_prune else " (default: all)"))
    g.add_argument(*names("--batch-size", "--eval-batch-size"), dest="eval_batch_size", type=int, default=4,
                   help="windows (and lm-eval requests) per forward")
    g.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help="positions per output-head chunk: bounds the logits held at once")
    g.add_argument("--full-logits", action="store_true",
                   help="compute each batch's full-vocabulary logits instead (the old, memory-hungry path)")


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
        "through lm-eval on local tasks. Every result records the protocol that produced it.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded SmolLM2)")
    add_perplexity_args(p)
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    add_task_args(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    add_device_args(p)
    p.set_defaults(func=run)


def check_eval_args(args: argparse.Namespace) -> None:
    """One-line :class:`CliError` for bad perplexity/task options (before anything is loaded)."""
    for flag, dest in (("--eval-seqlen", "eval_seqlen"), ("--eval-windows", "eval_windows"),
                       ("--eval-batch-size", "eval_batch_size"), ("--chunk-tokens", "chunk_tokens"),
                       ("--stride", "stride"), ("--limit", "limit")):
        check_positive(flag, getattr(args, dest, None))
    try:
        get_protocol(args.protocol, seqlen=args.eval_seqlen, stride=args.stride)
    except ValueError as exc:
        raise CliError(f"--protocol {args.protocol}: {exc}") from None
    for f in args.eval_text or []:
        if not Path(f).is_file():
            raise CliError(f"text file not found: {f}")
    if args.tasks_include is not None and not Path(args.tasks_include).is_dir():
        raise CliError(f"--tasks-include: not a folder: {args.tasks_include}")
    for task in split_list(args.tasks):
        if Path(task).suffix in (".jsonl", ".yaml", ".yml") and not Path(task).is_file():
            raise CliError(f"task file not found: {task}")
    if split_list(args.tasks) and lm_eval_version() is None:
        raise CliError("--tasks needs lm-eval: pip install 'armor-prune[eval]' (or pip install lm-eval)")


def evaluate(model: nn.Module, tokenizer: Any, args: argparse.Namespace, label: str = "") -> dict[str, Any]:
    """Perplexity (unless ``args.no_ppl``) and lm-eval accuracies (for ``args.tasks``) of a loaded model; prints one
    line per result and returns them as ``{"perplexity": {...}, "tasks": {...}}``."""
    out: dict[str, Any] = {}
    prefix = f"  [{label}] " if label else ""
    if not getattr(args, "no_ppl", False):
        docs, src = documents(args.eval_text, DEFAULT_EVAL_TEXT, "evaluation text")
        res = perplexity(
            model,
            docs,
            tokenizer,
            seqlen=args.eval_seqlen,
            max_windows=args.eval_windows,
            batch_size=args.eval_batch_size,
            progress=not getattr(args, "quiet", False),
            name=src,
            protocol=args.protocol,
            stride=args.stride,
            chunk_tokens=None if args.full_logits else args.chunk_tokens,
        )
        out["perplexity"] = res.to_json()
        extra = f", word ppl {res.word_perplexity:.3f}" if res.word_perplexity is not None else ""
        print(
            f"{prefix}perplexity on {src} ({res.protocol.name if res.protocol else args.protocol} protocol): "
            f"{res.ppl:.3f}{extra}  [{res.windows} windows of <= {res.seqlen}, {res.tokens} tokens scored, "
            f"{res.seconds:.1f} s]",
            flush=True,
        )
    tasks = split_list(args.tasks)
    if tasks:
        scores = run_lm_eval(
            model,
            tasks,
            tokenizer,
            batch_size=args.eval_batch_size,
            limit=None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit),
            include_path=args.tasks_include,
        )
        out["tasks"] = scores
        out["lm_eval_version"] = lm_eval_version()
        for task, metrics in scores.items():
            shown = ", ".join(
                f"{m} {v:.3f}" + (f" ± {metrics[m + '_stderr']:.3f}" if isinstance(metrics.get(m + "_stderr"), float)
                                  else "")
                for m, v in metrics.items()
                if isinstance(v, float) and not m.endswith("_stderr")
            )
            print(f"{prefix}{task}: {shown}  [{metrics.get('samples', '?')} examples]", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    if args.no_ppl and not split_list(args.tasks):
        raise CliError("nothing to evaluate: --no-ppl and no --tasks")
    check_eval_args(args)
    path = model_folder(args.model)
    device = check_device(args.device)
    tokenizer = load_tokenizer(path)
    model = load_model(path, args.dtype, device)
    out: dict[str, Any] = {"model": str(path), "command": command_line()}
    out.update(evaluate(model, tokenizer, args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0
