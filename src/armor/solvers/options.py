"""Method options: :class:`Option` (name, type, default, meaning) and the option tables shared by several methods.

The registry (:mod:`armor.solvers.registry`) lists each method's options; the solvers that share a table build
their settings object from it (:class:`armor.solvers.armor_fast.SweepSettings`), so a default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..factors import DEFAULT_WRAPPER_BUDGET

__all__ = ["Option", "ARMOR_COMMON", "SWEEP_OPTIONS"]

#: How an error message names an option's type.
_KIND = {int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Option:
    """One method option: its name, type, default and meaning (shown by ``armor prune --help-methods``)."""

    name: str
    type: type
    default: Any
    help: str
    optional: bool = False  # ``None`` is an accepted value (e.g. "no time cap")

    def convert(self, value: Any) -> Any:
        """``value`` (e.g. a command-line string) as this option's type; a ValueError naming the option."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"option {self.name!r} needs a value of type {self.type.__name__}")
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            if self.optional and text in ("none", ""):
                return None
            if self.type is bool:
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"option {self.name!r} is a yes/no option, got {value!r}")
        try:
            converted = self.type(value)
        except (TypeError, ValueError):
            kind = _KIND.get(self.type, self.type.__name__)
            raise ValueError(f"option {self.name!r} must be {kind}, got {value!r}") from None
        if self.type is int and isinstance(value, float) and value != converted:
            raise ValueError(f"option {self.name!r} must be an integer, got {value!r}")
        return converted


ARMOR_COMMON = (
    Option("block_size", int, None, "wrapper block size; default: chosen per layer from wrapper_budget", True),
    Option(
        "wrapper_budget", float, DEFAULT_WRAPPER_BUDGET,
        "largest share of the layer's dense parameter count the two wrappers may add (0.0625 = the paper's "
        "128 blocks on a 4096x4096 layer); ignored when block_size is given",
    ),
)

#: armor-fast's sweeps, shared by every solver built on them (armor-bh runs the same sweeps on another loss).
SWEEP_OPTIONS = (
    *ARMOR_COMMON,
    Option("sweeps", int, 20, "sweeps (A, B, core values, mask) at most"),
    Option("cg_steps", int, 2, "conjugate-gradient steps on the core values per sweep"),
    Option("mask_steps", int, 1, "mask steps per sweep"),
    Option("groups_per_tile", int, 64, "groups re-solved together per tile in a mask step"),
    Option("damping", float, 1e-6, "ridge of the A/B normal equations, relative to their mean diagonal"),
    Option("patience", int, 3, "stop after this many sweeps without a relative gain of rtol"),
    Option("rtol", float, 1e-4, "relative gain per sweep that counts as progress"),
    Option("max_seconds", float, None, "time cap per layer in seconds", True),
)
