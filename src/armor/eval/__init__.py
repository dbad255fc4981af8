"""Evaluation: perplexity under named protocols in bounded memory, and zero-shot accuracy through lm-eval."""

from .nll import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB, sum_token_nll
from .perplexity import PerplexityResult, perplexity, perplexity_windows, token_streams
from .protocols import PROTOCOLS, PerplexityProtocol, Window, get_protocol, plan_windows

__all__ = [
    "PerplexityResult",
    "perplexity",
    "perplexity_windows",
    "token_streams",
    "PerplexityProtocol",
    "PROTOCOLS",
    "Window",
    "get_protocol",
    "plan_windows",
    "sum_token_nll",
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_CHUNK_VOCAB",
]
