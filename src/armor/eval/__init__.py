"""Evaluation: perplexity on local text, and an optional lm-eval adapter."""

from .perplexity import PerplexityResult, perplexity, perplexity_windows

__all__ = ["PerplexityResult", "perplexity", "perplexity_windows"]
