"""Everything armor writes and reads back: atomic files, resumable layer files, checkpoints, pruned folders."""

from .atomic import atomic_save_safetensors, write_json_atomic, write_safetensors_streamed, write_text_atomic
from .checkpoint import CheckpointError, ShardReader, meta_skeleton, release_memory
from .folder import (
    MODEL_FORMAT,
    WEIGHTS_NAME,
    export_dense,
    is_pruned_folder,
    library_versions,
    load_model,
    load_pruned,
    load_tokenizer,
    plain_config_dict,
    pruned_modules,
    read_armor_config,
    resolve_dtype,
    save_pruned,
    save_pruned_streamed,
)
from .resume import LayerRecord, fingerprint, ids_digest, layer_file, layer_fingerprint, mean_losses

__all__ = [
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
