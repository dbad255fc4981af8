"""``armor eval`` (interim version; helper-2 replaces it with the protocol/lm-eval one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..eval import perplexity
from ..storage import load_model, load_tokenizer
from .common import DEFAULT_EVAL_TEXT, HelpFormatter, add_device_args, add_eval_args, check_device, documents

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a dense or pruned model folder", formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded SmolLM2)")
    add_eval_args(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .common import model_folder

    path = model_folder(args.model)
    device = check_device(args.device)
    tokenizer = load_tokenizer(path)
    model = load_model(path, args.dtype, device)
    docs, src = documents(args.eval_text, DEFAULT_EVAL_TEXT, "evaluation text")
    res = perplexity(model, docs, tokenizer, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                     batch_size=args.eval_batch_size, progress=True, name=f"evaluation text ({src})")
    out: dict[str, Any] = {"model": str(path), "perplexity": {"text": src, **res.to_json()}}
    print(f"perplexity on {src}: {res.ppl:.3f} ({res.windows} windows x {res.seqlen}, {res.seconds:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0
