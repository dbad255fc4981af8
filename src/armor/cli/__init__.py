"""The ``armor`` command: thin subcommands over the library.

Each subcommand lives in its own module with ``register(subparsers)`` and ``run(args) -> int``:
``prune`` (:mod:`armor.cli.prune`), ``eval`` (:mod:`armor.cli.eval`), ``inspect``, ``export`` and ``bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import sys
import time
from collections.abc import Iterator, Sequence

from safetensors import SafetensorError

from ..heap import heap_tunables
from ..storage import CheckpointError
from . import bench, export, inspect, prune
from . import eval as eval_command
from .common import CliError

__all__ = ["main", "console_main", "build_parser", "CliError"]

_SUBCOMMANDS = (prune, eval_command, inspect, export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armor", description="2:4 pruning of causal LMs with ARMOR and baselines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="{prune,eval,inspect,export,bench}")
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and warnings are noise next to ours: silence them for the command (and the
    worker processes it starts), then put back what the caller had, so an in-process ``main()`` leaks nothing."""
    from transformers.utils import logging as hf_logging

    env = os.environ.get("TRANSFORMERS_VERBOSITY")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = env
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


#: Lines of a multi-line error shown (torch's state-dict errors list every mismatched tensor).
MAX_ERROR_LINES = 12


def error_message(exc: BaseException) -> str:
    """What the user reads for ``exc``: every line of its message (up to :data:`MAX_ERROR_LINES`), quotes kept.

    ``KeyError`` is the one exception whose ``str`` adds quotes around the message; its argument is used as is.
    """
    raw = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    lines = [ln.strip() for ln in str(raw).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError):
        lines[0] = f"refused to unpickle a checkpoint (only weights are loaded; nothing in it ran): {lines[0]}"
    if len(lines) > MAX_ERROR_LINES:
        lines = [*lines[:MAX_ERROR_LINES], f"... ({len(lines) - MAX_ERROR_LINES} more lines; --debug shows all)"]
    return "\n  ".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``armor`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="armor: %(levelname)s: %(message)s")
    start = time.perf_counter()
    try:
        with _quiet_transformers():
            rc = args.func(args)
    except KeyboardInterrupt:
        print("armor: interrupted (finished layers are kept; rerun the same command to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (armor inspect ... | head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except (CliError, CheckpointError, ValueError, TypeError, FileNotFoundError, ImportError, OSError, RuntimeError,
            KeyError, pickle.UnpicklingError, SafetensorError) as exc:
        if args.debug:
            raise
        print(f"armor: error: {error_message(exc)}", file=sys.stderr)
        return 2
    if args.command == "prune" and not args.help_methods:
        print(f"total time: {time.perf_counter() - start:.0f} s")
    return int(rc or 0)


def console_main() -> int:
    """The installed ``armor`` script: :func:`main`, except that ``armor prune`` first starts itself again with
    the C heap settings that keep a long run's resident memory near what it holds (:mod:`armor.heap`; glibc reads
    them only when a process starts).  The restarted process inherits everything else, and the environment
    variable keeps it from restarting again."""
    argv = sys.argv[1:]
    command = next((a for a in argv if not a.startswith("-")), None)  # the global options take no value
    tunables = heap_tunables() if command == "prune" else None
    if tunables is not None:
        os.environ["GLIBC_TUNABLES"] = tunables
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-c", _RESTART, *argv])
    return main(argv)


#: What the restarted process runs (argparse's program name is fixed, so sys.argv[0] does not matter).
_RESTART = "import sys; from armor.cli import console_main; sys.exit(console_main())"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
