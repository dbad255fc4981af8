"""armor: 2:4 semi-structured pruning of LLMs with the ARMOR method (A · (W' ⊙ M) · B), baselines and runtime.

The per-layer maths lives in :mod:`armor.solvers` (ARMOR itself: :mod:`armor.solvers.armor`, the fast solver:
:mod:`armor.solvers.armor_fast`), the model plumbing in :mod:`armor.model`, the inference modules in
:mod:`armor.runtime` and the command line in :mod:`armor.cli`.
"""

from .api import export_dense, load
from .result import PruneResult
from .solvers import METHOD_NEEDS, METHODS, prune_layer
from .stats import LayerStats, StatsAccumulator

__version__ = "0.1.0"

__all__ = [
    "prune_layer",
    "PruneResult",
    "LayerStats",
    "StatsAccumulator",
    "METHODS",
    "METHOD_NEEDS",
    "load",
    "export_dense",
    "__version__",
]
