"""Model plumbing: layer selection, calibration, resumable pruning, saving/loading/exporting."""

from .calibration import (
    calibration_sequences,
    collect_stats,
    dataset_documents,
    read_documents,
    tokenize_documents,
)
from .io import export_dense, load_model, load_pruned, load_tokenizer, read_armor_config, save_pruned
from .layers import find_decoder_layers, find_prunable_layers, name_matches
from .pipeline import StatsCache, calibration_ids, prune_pretrained
from .prune import LayerRecord, PruneRun, method_options, prune_model

__all__ = [
    "find_decoder_layers",
    "find_prunable_layers",
    "name_matches",
    "read_documents",
    "dataset_documents",
    "tokenize_documents",
    "calibration_sequences",
    "calibration_ids",
    "collect_stats",
    "StatsCache",
    "prune_model",
    "prune_pretrained",
    "method_options",
    "PruneRun",
    "LayerRecord",
    "save_pruned",
    "load_pruned",
    "load_model",
    "load_tokenizer",
    "read_armor_config",
    "export_dense",
]
