"""Evaluation: perplexity under named protocols in bounded memory, and zero-shot accuracy through lm-eval.

    res = armor.eval.perplexity(model, documents, tokenizer, protocol="armor", seqlen=2048)   # recorded protocol
    res.to_json()["protocol"]
    armor.eval.run_lm_eval(model, ["britannica_completion", "my_items.jsonl"], tokenizer)     # offline tasks
"""

from .lm_eval_adapter import lm_eval_model, lm_eval_version, run_lm_eval
from .local_tasks import SHIPPED_TASKS, read_items, task_config, write_items
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
    "run_lm_eval",
    "lm_eval_model",
    "lm_eval_version",
    "SHIPPED_TASKS",
    "task_config",
    "read_items",
    "write_items",
]
