"""The ``armor`` command: thin subcommands over the library.

Each subcommand lives in its own module with ``register(subparsers)`` and ``run(args) -> int``:
``prune`` (:mod:`armor.cli.prune`), ``eval`` (:mod:`armor.cli.eval`), ``inspect``, ``export`` and ``bench``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from ..storage import CheckpointError
from . import bench, export, inspect, prune
from . import eval as eval_command
from .common import CliError

__all__ = ["main", "build_parser", "CliError"]

_SUBCOMMANDS = (prune, eval_command, inspect, export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armor", description="2:4 pruning of causal LMs with ARMOR and baselines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="{prune,eval,inspect,export,bench}")
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def _quiet_transformers() -> None:
    # transformers' own progress bars and warnings are noise next to ours
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``armor`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="armor: %(levelname)s: %(message)s")
    _quiet_transformers()
    start = time.perf_counter()
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("armor: interrupted (finished layers are kept; rerun the same command to resume)", file=sys.stderr)
        return 130
    except (CliError, CheckpointError, ValueError, TypeError, FileNotFoundError, ImportError, OSError, RuntimeError,
            KeyError) as exc:
        if args.debug:
            raise
        text = str(exc).strip().strip("'\"")
        msg = text.splitlines()[0] if text else type(exc).__name__
        print(f"armor: error: {msg}", file=sys.stderr)
        return 2
    if args.command == "prune":
        print(f"total time: {time.perf_counter() - start:.0f} s")
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
