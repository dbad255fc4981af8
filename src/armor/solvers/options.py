"""Method options: :class:`Option` (name, type, default, meaning) and the option tables shared by several methods.

The registry (:mod:`armor.solvers.registry`) lists each method's options; the ARMOR solvers build their settings
object from the same table (a :class:`WrapperSettings` subclass: :class:`armor.solvers.armor_fast.SweepSettings`,
:class:`armor.solvers.armor.FaithfulSettings`), so a default is written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..factors import DEFAULT_WRAPPER_BUDGET, resolve_block_sizes

__all__ = [
    "Option", "ARMOR_COMMON", "SWEEP_OPTIONS", "FAITHFUL_OPTIONS", "WrapperSettings", "resolve_options",
    "unknown_options",
]

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
    #: accepted range (JSON-schema style): ``minimum``/``maximum`` inclusive unless ``exclusive_*`` says so
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def check(self, value: Any) -> Any:
        """``value`` when it is finite and in range; a ValueError naming the option and the range otherwise."""
        if value is None or isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
            return value
        low_bad = self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        )
        high_bad = self.maximum is not None and (
            value >= self.maximum if self.exclusive_maximum else value > self.maximum
        )
        if not math.isfinite(value) or low_bad or high_bad:
            raise ValueError(f"option {self.name!r} must be {self.range_text()}, got {value!r}")
        return value

    def range_text(self) -> str:
        """The accepted values in words: "a finite number > 0 and < 1", "an integer >= 1"."""
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {self.maximum:g}")
        kind = "an integer" if self.type is int else "a finite number"
        return " ".join([kind, " and ".join(parts)]).strip()

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
        return self.check(converted)


ARMOR_COMMON = (
    Option(
        "block_size", int, None, "wrapper block size; default: chosen per layer from wrapper_budget", True, minimum=1
    ),
    Option(
        "wrapper_budget", float, DEFAULT_WRAPPER_BUDGET,
        "largest share of the layer's dense parameter count the two wrappers may add (0.0625 = the paper's "
        "128 blocks on a 4096x4096 layer; below 1 - n/m, 0.5 at 2:4, else the layer stores as many values as a "
        "dense one); ignored when block_size is given",
        minimum=0, exclusive_minimum=True, maximum=1, exclusive_maximum=True,
    ),
)

#: armor-fast's sweeps, shared by every solver built on them (armor-bh runs the same sweeps on another loss).
SWEEP_OPTIONS = (
    *ARMOR_COMMON,
    Option("sweeps", int, 20, "sweeps (A, B, core values, mask) at most", minimum=1),
    Option("cg_steps", int, 2, "conjugate-gradient steps on the core values per sweep", minimum=0),
    Option("mask_steps", int, 1, "mask steps per sweep", minimum=0),
    Option("groups_per_tile", int, 64, "groups re-solved together per tile in a mask step", minimum=1),
    Option("damping", float, 1e-6, "ridge of the A/B normal equations, relative to their mean diagonal", minimum=0),
    Option("patience", int, 3, "stop after this many sweeps without a relative gain of rtol (0: never)", minimum=0),
    Option("rtol", float, 1e-4, "relative gain per sweep that counts as progress", minimum=0),
    Option("max_seconds", float, None, "time cap per layer in seconds", True, minimum=0, exclusive_minimum=True),
)

#: the paper's schedule (``armor``): Adam steps and group sampling.
FAITHFUL_OPTIONS = (
    *ARMOR_COMMON,
    Option("iterations", int, 20_000, "iterations (one Adam step + one sparse-core step each)", minimum=1),
    Option("lr", float, 1e-4, "Adam learning rate", minimum=0, exclusive_minimum=True),
    Option("patience", int, 100, "stop after this many iterations without a relative gain of rtol (0: never)",
           minimum=0),
    Option("rtol", float, 1e-6, "relative gain that counts as progress", minimum=0),
    Option("seed", int, 0, "seed of the group sampling"),
)


def unknown_options(table: tuple[Option, ...], names: list[str], owner: str) -> TypeError:
    """The error for option ``names`` that ``table`` lacks: it names ``owner`` and the accepted options."""
    accepted = ", ".join(o.name for o in table) or "none"
    return TypeError(f"{owner} takes no option {', '.join(map(repr, names))} (its options: {accepted})")


def resolve_options(table: tuple[Option, ...], given: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Every option of ``table`` with its value: the given ones (checked and converted), the table's defaults for
    the rest.  A name the table lacks is a TypeError naming ``owner`` and the accepted options."""
    if not isinstance(given, Mapping):
        raise TypeError(f"{owner}: options must be a mapping of option names to values, got {given!r}")
    names = {o.name for o in table}
    unknown = [name for name in given if name not in names]
    if unknown:
        raise unknown_options(table, unknown, owner)
    return {o.name: o.convert(given[o.name]) if o.name in given else o.default for o in table}


@dataclass(frozen=True)
class WrapperSettings:
    """An ARMOR solver's options, one value each, built from its table (``TABLE``, where the defaults and meanings
    are) with :meth:`from_options`.  The fields are the table's names in its order; this base holds the
    wrapper-block choice that every ARMOR solver shares."""

    TABLE: ClassVar[tuple[Option, ...]] = ARMOR_COMMON
    OWNER: ClassVar[str] = "an ARMOR solver"

    block_size: int | None
    wrapper_budget: float

    @classmethod
    def from_options(cls, **options: Any) -> WrapperSettings:
        """The given options (checked and converted), the table's defaults for the rest; an unknown name is a
        TypeError naming the accepted ones."""
        return cls(**resolve_options(cls.TABLE, options, cls.OWNER))

    def block_sizes(self, out_features: int, in_features: int, m: int) -> tuple[int, int]:
        """The wrapper blocks ``(bo, bi)`` for a layer (:func:`armor.factors.resolve_block_sizes`)."""
        return resolve_block_sizes(out_features, in_features, self.block_size, self.wrapper_budget, m)

    def extras(self) -> dict[str, Any]:
        """What a result records about the block choice: the budget when it chose the blocks."""
        return {} if self.block_size is not None else {"wrapper_budget": self.wrapper_budget}
