"""armor: 2:4 semi-structured pruning of LLMs with the ARMOR method (A · (W' ⊙ M) · B), baselines and runtime.

The public API fits on one screen::

    import armor

    run = armor.prune(model, calibration_ids, "armor-fast", output="out/armor")   # a model, or a folder
    res = armor.prune_layer(weight, hessian_diag, "armor-fast")                   # one matrix
    model = armor.load("out/armor")                                               # a pruned folder back
    armor.export_dense("out/armor", "out/dense")                                  # plain HF folder
    armor.METHODS["armor-fast"].options                                           # the registry

Where things live: the ARMOR step in :mod:`armor.solvers.armor`, the data flow in :mod:`armor.pipeline.driver`,
the algorithm's specification in ``docs/algorithm.md``.
"""

from .pipeline import PruneRun, PruneSettings, RayExecutor, ReconstructSettings, prune
from .result import PruneResult
from .solvers import METHODS, Method, Option, get_method, prune_layer
from .stats import LayerStats, StatsAccumulator
from .storage import export_dense, save_pruned
from .storage import load_pruned as load
from .text import calibration_ids
from .version import __version__

__all__ = [
    "prune",
    "PruneRun",
    "PruneSettings",
    "ReconstructSettings",
    "RayExecutor",
    "prune_layer",
    "PruneResult",
    "LayerStats",
    "StatsAccumulator",
    "METHODS",
    "Method",
    "Option",
    "get_method",
    "load",
    "save_pruned",
    "export_dense",
    "calibration_ids",
    "__version__",
]
