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
from .options import FAITHFUL_OPTIONS, SWEEP_OPTIONS, Option, resolve_options, unknown_options

__all__ = ["Option", "Method", "METHODS", "get_method"]


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
        raise unknown_options(self.options, [name], f"method {self.name!r}")

    def resolve(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option of the method with its value: the given ones (checked and converted), else the defaults.

        Unknown options are a TypeError naming the accepted ones.
        """
        return resolve_options(self.options, options or {}, f"method {self.name!r}")

    @property
    def stats_kind(self) -> str:
        """What the pipeline collects for this method: its needs, and never less than the diagonal (the proxy
        loss every record reports is weighted by it)."""
        return "full" if self.needs == "full" else "diagonal"


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
                Option("column_batch", int, 128, "columns updated together before the lazy batch update", minimum=1),
                Option("damp", float, 0.01, "fraction of the mean Hessian diagonal added to the diagonal", minimum=0),
            ),
        ),
        Method(
            "armor",
            "diagonal",
            "the paper's schedule: joint Adam step on A, B and the core, then one exact sparse-core step per tile",
            armor_faithful,
            FAITHFUL_OPTIONS,
            wrappers=True,
        ),
        Method(
            "armor-fast",
            "diagonal",
            "exact A/B block updates, CG on the core values, exact multi-group mask steps; every step monotone",
            armor_fast,
            SWEEP_OPTIONS,
            wrappers=True,
        ),
        Method(
            "armor-bh",
            "full",
            "armor-fast on the proxy loss weighted by the diagonal blocks of X^T X instead of its diagonal "
            "(beyond the paper; losses reported under that objective)",
            armor_blockhess,
            SWEEP_OPTIONS,
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
