"""Mixture-of-experts weights as one ``nn.Linear`` per expert matrix, so that each expert is pruned as its own layer.

transformers 5 stores the experts of Mixtral, Qwen3-MoE and their relatives as two stacked 3-D parameters inside
one module: ``gate_up_proj`` ``(E, 2I, H)`` (gate and up projections concatenated) and ``down_proj`` ``(E, H, I)``;
its forward runs, for each expert the router picked, ``down(act(gate(x)) * up(x))`` on the tokens routed to it.
Nothing there is an ``nn.Linear``, so layer discovery cannot see the experts.

:func:`unfuse_experts` replaces such a module by :class:`LinearExperts`, which holds the same weights as ``2E``
``nn.Linear`` layers (``<experts>.gate_up_proj.<e>`` and ``<experts>.down_proj.<e>``) and computes the same
forward.  Each expert's layers then only ever see the tokens routed to that expert, so the statistics gathered on
them are exactly that expert's calibration statistics, and the pruning driver treats them like any other layer
(a pruned layer is a packed module in the same slot).  A pruned folder records which experts modules were unfused
(``quantization_config.unfused_experts``) so that both loaders rebuild the same structure before reading weights,
and :func:`restack_experts` puts dense stacked parameters back for a plain Hugging Face export.  While a CUDA graph
is being captured, :class:`LinearExperts` runs every expert on every token instead (no host read-back of the
routing, which a graph cannot hold), so a pruned MoE model's decode step can be captured like a dense one.

Only the layout above is handled (transformers' default experts flags: concatenated gate/up, not transposed, no
bias, gated, no post-expert norm); other experts modules are left alone and layer discovery reports them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["LinearExperts", "stacked_experts", "unfuse_experts", "restack_experts"]

# transformers' experts-implementation flags (set by @use_experts_implementation) of the layout handled here
_LAYOUT = {"has_gate": True, "has_bias": False, "has_post_expert_norm": False, "is_transposed": False,
           "is_concatenated": True}


def _is_stacked_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters())  # the activation is a child module without parameters
    if set(params) != {"gate_up_proj", "down_proj"} or not callable(getattr(module, "act_fn", None)):
        return False
    if any(getattr(module, flag, default) != default for flag, default in _LAYOUT.items()):
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    e, two_i, h = gate_up.shape
    return two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)


def stacked_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The experts modules of ``model`` in the stacked layout :class:`LinearExperts` can replace, by name."""
    return {name: mod for name, mod in model.named_modules() if name and _is_stacked_experts(mod)}


def _capturing(x: Tensor) -> bool:
    """Whether ``x``'s forward is being recorded into a CUDA graph (which a host read-back would break)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class LinearExperts(nn.Module):
    """The experts of one mixture-of-experts layer as ``nn.Linear`` layers (or their pruned packed modules).

    ``gate_up_proj[e]`` maps ``hidden -> 2 * intermediate`` (gate rows first, then up rows) and ``down_proj[e]``
    ``intermediate -> hidden``; ``forward(hidden_states, top_k_index, top_k_weights)`` is the stacked module's.
    """

    def __init__(self, stacked: nn.Module) -> None:
        super().__init__()
        gate_up, down = stacked.gate_up_proj, stacked.down_proj
        self.num_experts, two_i, self.hidden_dim = gate_up.shape
        self.intermediate_dim = two_i // 2
        self.act_fn = stacked.act_fn
        kw = {"bias": False, "dtype": gate_up.dtype, "device": gate_up.device}
        self.gate_up_proj = nn.ModuleList(
            nn.Linear(self.hidden_dim, two_i, **kw) for _ in range(self.num_experts)
        )
        self.down_proj = nn.ModuleList(
            nn.Linear(self.intermediate_dim, self.hidden_dim, **kw) for _ in range(self.num_experts)
        )
        if not gate_up.is_meta:
            with torch.no_grad():
                for e in range(self.num_experts):
                    self.gate_up_proj[e].weight.copy_(gate_up[e])
                    self.down_proj[e].weight.copy_(down[e])
        # The original module (its parameters dropped to meta) is the template restack_experts fills again.
        template = copy.copy(stacked)
        template._parameters = {k: nn.Parameter(torch.empty_like(v, device="meta"), requires_grad=False)
                                for k, v in stacked._parameters.items()}
        self.__dict__["stacked_template"] = template  # not a submodule: no state-dict entries

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if _capturing(hidden_states):
            return self.every_expert_forward(hidden_states, top_k_index, top_k_weights)
        return self.routed_forward(hidden_states, top_k_index, top_k_weights)

    def routed_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """Each expert the router picked, on the tokens routed to it (transformers' eager experts forward).  Which
        experts and tokens is data-dependent: the host reads it back, so a CUDA graph cannot capture this."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # (experts, top_k, tokens) membership, as in transformers' eager experts forward
            hit_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(hit_mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(hit_mask[e])
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def every_expert_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """Every expert on every token, each token's output the sum of its routed experts' outputs times their
        routing weights (the routed forward's result): fixed shapes and no host synchronisation, so a CUDA graph
        can capture it, at ``num_experts / top_k`` times the routed forward's compute and every expert's weights
        read (what a token batch that reaches every expert reads anyway).  An expert's output on a token not
        routed to it is discarded, not multiplied by zero, so it cannot turn the sum non-finite."""
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            chosen = top_k_index == e  # (tokens, top_k); an expert appears at most once in a token's top-k
            weight = (top_k_weights * chosen).sum(-1, keepdim=True)
            gate, up = self.gate_up_proj[e](hidden_states).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * weight
            out += torch.where(chosen.any(-1, keepdim=True), y, 0).to(out.dtype)
        return out

    def dense_stacks(self) -> tuple[Tensor, Tensor]:
        """``(gate_up (E, 2I, H), down (E, H, I))`` dense weights (pruned experts multiplied out)."""

        def dense(layer: nn.Module) -> Tensor:
            w = layer.dense_weight() if callable(getattr(layer, "dense_weight", None)) else layer.weight
            return w.detach()

        return (torch.stack([dense(m) for m in self.gate_up_proj]), torch.stack([dense(m) for m in self.down_proj]))


@torch.no_grad()
def _same_forward(stacked: nn.Module, unfused: LinearExperts) -> bool:
    """Whether both modules compute the same output on random tokens and routing (the layout check)."""
    gen = torch.Generator().manual_seed(0)
    p = stacked.gate_up_proj
    tokens, top_k = 8, min(2, unfused.num_experts)
    x = torch.randn(tokens, unfused.hidden_dim, generator=gen).to(p.device, p.dtype)
    index = torch.stack([torch.randperm(unfused.num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen).to(p.device, p.dtype)
    a, b = stacked(x, index.to(p.device), weights), unfused(x, index.to(p.device), weights)
    tol = 1e-4 if p.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp_min(1))))


def unfuse_experts(model: nn.Module, names: Iterable[str] | None = None, check: bool = True) -> list[str]:
    """Replace stacked experts modules of ``model`` by :class:`LinearExperts` (same weights, same outputs).

    Args:
        names: the experts modules to replace (default: every one :func:`stacked_experts` finds).  A name that is
            not a stacked experts module raises ValueError naming it.
        check: compare both forwards on random inputs first (skipped on the meta device) and raise ValueError if
            they differ, i.e. the module's forward is not the layout this module reproduces.

    Returns:
        the names replaced.
    """
    found = stacked_experts(model)
    todo = list(found) if names is None else list(names)
    for name in todo:
        if name not in found:
            try:
                kind = type(_get(model, name)).__name__
            except AttributeError:
                kind = "nothing"
            raise ValueError(f"{name} is {kind}, not a stacked mixture-of-experts module armor can unfuse")
        stacked = found[name]
        unfused = LinearExperts(stacked)
        if check and not stacked.gate_up_proj.is_meta and not _same_forward(stacked, unfused):
            raise ValueError(
                f"{name} ({type(stacked).__name__}): its forward differs from the standard gated experts forward; "
                "armor cannot prune its experts as separate layers"
            )
        _set(model, name, unfused)
    return todo


@torch.no_grad()
def restack_experts(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, LinearExperts]:
    """Put the stacked experts modules back, with dense weights (pruned experts multiplied out), in place of every
    :class:`LinearExperts` (or those of ``names``); returns the replaced modules by name so a caller can put them
    back."""
    wanted = None if names is None else set(names)
    replaced = {name: mod for name, mod in model.named_modules()
                if isinstance(mod, LinearExperts) and (wanted is None or name in wanted)}
    for name, mod in replaced.items():
        gate_up, down = mod.dense_stacks()  # new tensors (stacked), shared with nothing
        stacked = copy.copy(mod.stacked_template)
        stacked._parameters = {"gate_up_proj": nn.Parameter(gate_up), "down_proj": nn.Parameter(down)}
        _set(model, name, stacked)
    return replaced
