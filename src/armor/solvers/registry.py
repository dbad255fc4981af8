"""The method registry: every per-layer method with the statistics it needs and the options it takes.

This is the one description of the methods.  :func:`armor.prune_layer`, the pipeline's layer jobs, the resume
fingerprints and the command line all read it; adding a method means adding one :class:`Method` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import baselines
from .armor import armor_faithful
from .armor_blockhess import armor_blockhess
from .armor_fast import armor_fast

__all__ = ["Option", "Method", "METHODS", "STATS_KINDS", "get_method", "method_names"]

#: What a method needs from the calibration data, weakest first.  The pipeline always collects at least the
#: Hessian diagonal when it has calibration data, so every method's proxy loss is weighted the same way.
STATS_KINDS = ("none", "diagonal", "full")


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
            raise ValueError(f"option {self.name!r} must be a {self.type.__name__}, got {value!r}") from None
        if self.type is int and isinstance(value, float) and value != converted:
            raise ValueError(f"option {self.name!r} must be an integer, got {value!r}")
        return converted


@dataclass(frozen=True)
class Method:
    """A per-layer pruning method.

    ``needs`` is what its mask and weights need (``"none"``, ``"diagonal"`` or ``"full"``); ``wrappers`` says
    whether it returns ARMOR factors.  ``solve`` does the work: for the ARMOR methods it is called as
    ``solve(wn, h, nowag_mask, r, c, n=, m=, **options)`` on the normalised weight, for the others as
    ``solve(weight, stats, n=, m=, **options)`` and returns ``(pruned_weight, mask)``.
    """

    name: str
    needs: str
    summary: str
    solve: Callable[..., Any]
    options: tuple[Option, ...] = ()
    wrappers: bool = False
    #: the proxy loss the solver minimises and reports (its ``nowag_loss`` is NoWag-P's under the same one):
    #: ``"diagonal"`` (the paper's, docs/algorithm.md §3) or ``"block-hessian"`` (the input Hessian's diagonal
    #: blocks; such a solver also gets the full Hessian as ``hessian=``)
    objective: str = "diagonal"

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        accepted = ", ".join(o.name for o in self.options) or "none"
        raise TypeError(f"method {self.name!r} takes no option {name!r} (its options: {accepted})")

    def resolve(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option of the method with its value: the given ones (checked and converted), else the defaults.

        Unknown options are a TypeError naming the accepted ones.
        """
        given = dict(options or {})
        for name in given:
            self.option(name)
        return {o.name: o.convert(given[o.name]) if o.name in given else o.default for o in self.options}

    @property
    def stats_kind(self) -> str:
        """What the pipeline collects for this method: its needs, and never less than the diagonal (the proxy
        loss every record reports is weighted by it)."""
        return "full" if self.needs == "full" else "diagonal"


_ARMOR_COMMON = (
    Option("block_size", int, None, "wrapper block size; default: chosen per layer from wrapper_budget", True),
    Option(
        "wrapper_budget", float, 0.0625,
        "largest share of the layer's dense parameter count the two wrappers may add (0.0625 = the paper's "
        "128 blocks on a 4096x4096 layer); ignored when block_size is given",
    ),
)

#: armor-fast's sweeps, shared by every solver built on them (armor-bh runs the same sweeps on another loss).
_SWEEP_OPTIONS = (
    *_ARMOR_COMMON,
    Option("sweeps", int, 20, "sweeps (A, B, core values, mask) at most"),
    Option("cg_steps", int, 2, "conjugate-gradient steps on the core values per sweep"),
    Option("mask_steps", int, 1, "mask steps per sweep"),
    Option("groups_per_tile", int, 64, "groups re-solved together per tile in a mask step"),
    Option("damping", float, 1e-6, "ridge of the A/B normal equations, relative to their mean diagonal"),
    Option("patience", int, 3, "stop after this many sweeps without a relative gain of rtol"),
    Option("rtol", float, 1e-4, "relative gain per sweep that counts as progress"),
    Option("max_seconds", float, None, "time cap per layer in seconds", True),
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", "none", "top-2 of |W| per group of 4", baselines.magnitude),
        Method(
            "wanda", "diagonal", "top-2 of |W| * ||X_j|| per group of 4 (Sun et al. 2023), no weight update",
            baselines.wanda,
        ),
        Method(
            "nowag", "diagonal", "NoWag-P: top-2 of Wn^2 h on the row/column-normalised weight", baselines.nowag_p
        ),
        Method(
            "sparsegpt",
            "full",
            "OBS mask choice and weight update with the full X^T X (Frantar & Alistarh 2023)",
            baselines.sparsegpt,
            (
                Option("column_batch", int, 128, "columns updated together before the lazy batch update"),
                Option("damp", float, 0.01, "fraction of the mean Hessian diagonal added to the diagonal"),
            ),
        ),
        Method(
            "armor",
            "diagonal",
            "the paper's schedule: joint Adam step on A, B and the core, then one exact sparse-core step per tile",
            armor_faithful,
            (
                *_ARMOR_COMMON,
                Option("iterations", int, 20_000, "iterations (one Adam step + one sparse-core step each)"),
                Option("lr", float, 1e-4, "Adam learning rate"),
                Option("patience", int, 100, "stop after this many iterations without a relative gain of rtol"),
                Option("rtol", float, 1e-6, "relative gain that counts as progress"),
                Option("seed", int, 0, "seed of the group sampling"),
            ),
            wrappers=True,
        ),
        Method(
            "armor-fast",
            "diagonal",
            "exact A/B block updates, CG on the core values, exact multi-group mask steps; every step monotone",
            armor_fast,
            _SWEEP_OPTIONS,
            wrappers=True,
        ),
        Method(
            "armor-bh",
            "full",
            "armor-fast on the proxy loss weighted by the diagonal blocks of X^T X instead of its diagonal "
            "(beyond the paper; losses reported under that objective)",
            armor_blockhess,
            _SWEEP_OPTIONS,
            wrappers=True,
            objective="block-hessian",
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``; a ValueError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)

