"""Everything armor writes and reads back: atomic files, resumable layer files, checkpoints, pruned folders.

Pruned folders by job: :mod:`.writer` (the format and its writer), :mod:`.reader` (``armor.load``), :mod:`.legacy`
(armor 0.1's format), :mod:`.plain` (any model folder, pruned or plain Hugging Face), :mod:`.export`
(``export_dense``), :mod:`.verify` (what ``armor inspect`` checks), :mod:`.lock` (one writer per output folder),
:mod:`.guard` (the empty tensors that make transformers without armor raise on a pruned folder).
"""

from ..dtypes import resolve_dtype
from .atomic import atomic_save_safetensors, write_json_atomic, write_safetensors_streamed, write_text_atomic
from .checkpoint import CheckpointError, ShardReader, meta_skeleton, release_memory
from .export import export_dense
from .hf_quantizer import MODEL_FORMAT
from .plain import load_model, load_tokenizer, stored_dtype
from .reader import is_pruned_folder, load_pruned, read_armor_config
from .resume import LayerRecord, fingerprint, ids_digest, layer_file, layer_fingerprint, mean_losses
from .writer import (
    WEIGHTS_NAME,
    library_versions,
    mark_pruned,
    plain_config_dict,
    pruned_modules,
    save_pruned,
    save_pruned_streamed,
)

__all__ = [
    "stored_dtype",
    "atomic_save_safetensors",
    "write_json_atomic",
    "write_text_atomic",
    "write_safetensors_streamed",
    "CheckpointError",
    "ShardReader",
    "meta_skeleton",
    "release_memory",
    "MODEL_FORMAT",
    "WEIGHTS_NAME",
    "export_dense",
    "is_pruned_folder",
    "library_versions",
    "mark_pruned",
    "load_model",
    "load_pruned",
    "load_tokenizer",
    "plain_config_dict",
    "pruned_modules",
    "read_armor_config",
    "resolve_dtype",
    "save_pruned",
    "save_pruned_streamed",
    "LayerRecord",
    "fingerprint",
    "ids_digest",
    "layer_file",
    "layer_fingerprint",
    "mean_losses",
]
