"""Perplexity protocols: every choice that changes a perplexity number, named and recorded with the result.

"My perplexity does not match the paper" almost always comes down to one of these settings: the window length,
whether windows overlap, how documents are joined, whether a BOS token is added, and which tokens are scored.
A :class:`PerplexityProtocol` holds all of them; :data:`PROTOCOLS` has the presets the field uses:

``armor``
    The protocol of the SparseGPT, Wanda and ARMOR evaluation scripts: documents joined with ``"\\n\\n"``,
    tokenised once without special tokens, cut into non-overlapping windows of ``seqlen`` tokens (the tail
    shorter than a window is dropped), every window scored on its own, the first token of each window is context
    only. ``ppl = exp(mean NLL)`` over the scored tokens. (Those scripts call the tokenizer with its defaults,
    which for Llama tokenizers puts one BOS at the very start of the stream, i.e. in the first window only; set
    ``add_special_tokens=None`` to reproduce that exactly.)
``lm-eval-rolling``
    lm-evaluation-harness's ``loglikelihood_rolling`` (the wikitext-style perplexity tasks): every document is its
    own token stream (tokeniser defaults, as lm-eval's ``tok_encode``), preceded by a prefix token (BOS, or EOS
    when the tokenizer has none; lm-eval's ``prefix_token_id``) so that the document's first token is scored
    too. Windows follow ``lm_eval.utils.get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``:
    each window predicts up to ``seqlen`` new tokens from the one token before them, and the last window is
    right-aligned to the end of the document (so its new tokens get a longer context). Here ``seqlen`` plays the
    part of lm-eval's ``max_length``. Reported as token perplexity ``exp(sum NLL / tokens)``, plus lm-eval's own
    ``word_perplexity`` and ``bits_per_byte`` when every document is scored completely.
``strided``
    Hugging Face's "Perplexity of fixed-length models" guide: documents joined with ``"\\n\\n"`` and tokenised
    once with the tokenizer's defaults, windows of ``seqlen`` tokens that start every ``stride`` tokens; each
    window scores only the tokens no earlier window scored, so every token after the first is scored once with
    at least ``seqlen - stride`` tokens of context. ``stride == seqlen`` gives disjoint windows. The NLL is
    averaged over the scored tokens exactly (the guide's loop weights each window's mean loss by its number of
    valid labels minus one, which undercounts every window after the first by one token, so its number differs
    in the fourth or fifth digit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = [
    "PerplexityProtocol",
    "PROTOCOLS",
    "Window",
    "get_protocol",
    "plan_windows",
]

_WINDOWING = ("disjoint", "rolling", "strided")
_DOCUMENTS = ("joined", "separate")


@dataclass(frozen=True)
class PerplexityProtocol:
    """How a perplexity is measured; :meth:`to_json` goes into every result.

    Attributes:
        name: preset name (or a user's own label).
        seqlen: tokens the model reads per window (lm-eval's ``max_length`` for ``rolling``).
        windowing: ``"disjoint"``, ``"rolling"`` or ``"strided"`` (see the module docstring).
        stride: for ``strided``: tokens between window starts (``<= seqlen``); ``None`` elsewhere.
        documents: ``"joined"``: documents joined with ``separator`` and tokenised once, windows cross document
            boundaries; ``"separate"``: every document is its own token stream, windows never cross documents.
        separator: what joins documents when ``documents == "joined"``.
        add_special_tokens: passed to the tokenizer when encoding each stream; ``None`` keeps the tokenizer's
            default (e.g. a BOS for Llama tokenizers, nothing for GPT-2 style ones).
        prefix_token: prepend the BOS id (the EOS id when there is no BOS) to each stream as context, so that its
            first real token is scored.
    """

    name: str
    seqlen: int = 512
    windowing: str = "disjoint"
    stride: int | None = None
    documents: str = "joined"
    separator: str = "\n\n"
    add_special_tokens: bool | None = False
    prefix_token: bool = False

    def __post_init__(self) -> None:
        if self.windowing not in _WINDOWING:
            raise ValueError(f"windowing must be one of {', '.join(_WINDOWING)}, got {self.windowing!r}")
        if self.documents not in _DOCUMENTS:
            raise ValueError(f"documents must be one of {', '.join(_DOCUMENTS)}, got {self.documents!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < (1 if self.windowing == "rolling" else 2):
            raise ValueError(f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        if self.windowing == "strided":
            if self.stride is None or not 1 <= self.stride <= self.seqlen:
                raise ValueError(f"strided windows need 1 <= stride <= seqlen ({self.seqlen}), got {self.stride!r}")
        elif self.stride is not None:
            raise ValueError(f"stride only applies to strided windows, not {self.windowing!r}")

    @property
    def scores_window_start(self) -> bool:
        """Whether the first token a window reads is also scored in it (only when some earlier token exists)."""
        return self.windowing == "rolling"

    def describe(self) -> str:
        """One line for reports."""
        docs = f"documents joined with {self.separator!r}" if self.documents == "joined" else "each document alone"
        bos = {None: "tokenizer's special tokens", True: "special tokens added", False: "no special tokens"}[
            self.add_special_tokens
        ]
        pre = ", BOS/EOS prefix token" if self.prefix_token else ""
        if self.windowing == "disjoint":
            win = f"non-overlapping windows of {self.seqlen} (first token of each window not scored, tail dropped)"
        elif self.windowing == "rolling":
            win = f"rolling windows of {self.seqlen} (every token scored once, last window right-aligned)"
        else:
            win = f"windows of {self.seqlen} every {self.stride} tokens (only new tokens scored)"
        return f"{self.name}: {docs}, {bos}{pre}, {win}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores_window_start"] = self.scores_window_start
        out["description"] = self.describe()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PerplexityProtocol:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


#: The presets, by name (``seqlen``/``stride`` are defaults; :func:`get_protocol` overrides them).
PROTOCOLS: dict[str, PerplexityProtocol] = {
    "armor": PerplexityProtocol("armor", windowing="disjoint", documents="joined", add_special_tokens=False),
    "lm-eval-rolling": PerplexityProtocol(
        "lm-eval-rolling", windowing="rolling", documents="separate", add_special_tokens=None, prefix_token=True
    ),
    "strided": PerplexityProtocol(
        "strided", windowing="strided", stride=256, documents="joined", add_special_tokens=None
    ),
}


def get_protocol(
    protocol: str | PerplexityProtocol = "armor", seqlen: int | None = None, stride: int | None = None
) -> PerplexityProtocol:
    """A preset by name (or a protocol as given), with ``seqlen``/``stride`` replaced where given.

    For ``strided``, a new ``seqlen`` without a ``stride`` gives ``stride = seqlen // 2`` (the guide's ratio).
    """
    if isinstance(protocol, PerplexityProtocol):
        base = protocol
    elif protocol in PROTOCOLS:
        base = PROTOCOLS[protocol]
    else:
        raise ValueError(f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    changes: dict[str, Any] = {}
    if seqlen is not None:
        changes["seqlen"] = seqlen
    if stride is not None:
        if base.windowing != "strided":
            raise ValueError(f"stride only applies to the strided protocol, not {base.name!r}")
        changes["stride"] = stride
    elif seqlen is not None and base.windowing == "strided":
        changes["stride"] = max(1, seqlen // 2)
    return replace(base, **changes) if changes else base


@dataclass(frozen=True)
class Window:
    """One forward pass over a token stream ``s``: the model reads ``s[begin:end]`` and the tokens
    ``s[target_begin:target_end]`` are scored, each from the logits one position before it
    (so ``begin < target_begin`` and ``target_end <= end + 1``)."""

    begin: int
    end: int
    target_begin: int
    target_end: int

    @property
    def scored(self) -> int:
        return self.target_end - self.target_begin


def plan_windows(n_tokens: int, protocol: PerplexityProtocol) -> list[Window]:
    """The windows ``protocol`` scores on a stream of ``n_tokens`` tokens (prefix token included, if any)."""
    length = protocol.seqlen
    if protocol.windowing == "disjoint":
        starts = range(0, n_tokens - length + 1, length)
        return [Window(b, b + length, b + 1, b + length) for b in starts]
    if protocol.windowing == "rolling":
        # lm_eval.utils.get_rolling_token_windows(context_len=1) + make_disjoint_window, in stream positions:
        # target stream position j is document token j - 1 when a prefix token leads the stream.
        n_targets = n_tokens - 1
        if n_targets < 1:
            return []
        first = min(length, n_targets)
        out = [Window(0, first, 1, first + 1)]
        predicted = first
        while predicted < n_targets:
            new = min(n_targets - predicted, length)
            end = predicted + new
            out.append(Window(end - length, end, predicted + 1, end + 1))
            predicted = end
        return out
    # strided: the Hugging Face guide's loop
    out = []
    prev_end = 0
    stride = protocol.stride or length
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        target_begin = max(prev_end, begin + 1)  # the window's first token has nothing before it to predict it
        if end > target_begin:
            out.append(Window(begin, end, target_begin, end))
        prev_end = end
        if end == n_tokens:
            break
    return out
