"""What armor knows about Hugging Face causal LMs: where the decoder blocks are and which linear layers to prune."""

from .experts import LinearExperts, restack_experts, stacked_experts, unfuse_experts
from .layers import (
    check_token_ids,
    find_decoder_layers,
    find_prunable_layers,
    get_module,
    model_device,
    name_matches,
    position_limit,
    set_module,
)

__all__ = [
    "check_token_ids",
    "position_limit",
    "find_decoder_layers",
    "find_prunable_layers",
    "get_module",
    "set_module",
    "model_device",
    "name_matches",
    "LinearExperts",
    "stacked_experts",
    "unfuse_experts",
    "restack_experts",
]
