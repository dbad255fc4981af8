"""Memory and time of block reconstruction's training step on one random Llama block of ARMOR layers (blocks 128).

    python benchmarks/reconstruct_step.py [--hidden 2048] [--intermediate 5632] [--seqlen 512] [--batch 4]
                                          [--steps 3] [--dtype bfloat16]

Builds one decoder block, puts a training view (``armor.pipeline.reconstruct._TrainView``) of a random packed
ARMOR layer in place of each linear, and runs ``--steps`` Adam steps of the reconstruction loss on random inputs
and targets, as ``reconstruct_block`` trains (autocast in ``--dtype`` unless float32, one torch thread).  Prints
the bytes the step's forward keeps for its backward (distinct storages, the views' parameters and the input
included), the mean time of a step after a first one, the final loss, and the process's peak resident memory.
To compare two versions of armor, run the script with each one first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from armor.bench.layers import random_nm_result
from armor.models import get_module, set_module
from armor.pipeline.reconstruct import _error_terms, _output, _TrainView
from armor.runtime import module_from_result


def build(hidden: int, intermediate: int, seqlen: int, batch: int) -> tuple:
    """The block, its call arguments and the views in place of its linears."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                      max_position_embeddings=seqlen)
    model = LlamaForCausalLM(cfg).eval()
    layer, seen = model.model.layers[0], {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 256, (batch, seqlen)), use_cache=False)
    hook.remove()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    views = []
    for i, name in enumerate(names):
        w = get_module(model, name).weight
        views.append(_TrainView(module_from_result(random_nm_result(w.shape[0], w.shape[1], 128, seed=i), None)))
        set_module(model, name, views[-1])
    trained = {id(p) for v in views for p in v.parameters()}
    for p in layer.parameters():
        p.requires_grad_(id(p) in trained)
    return layer, seen["args"][1:], seen["kwargs"], views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    layer, args, kwargs, views = build(a.hidden, a.intermediate, a.seqlen, a.batch)
    x, t = torch.randn(a.batch, a.seqlen, a.hidden), torch.randn(a.batch, a.seqlen, a.hidden)
    opt = torch.optim.Adam([p for v in views for p in v.parameters()], lr=1e-4)
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=getattr(torch, a.dtype), enabled=a.dtype != "float32")
    with torch.enable_grad(), autocast:
        for step in range(a.steps + 1):
            if step == 1:
                start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(keep if step == 0 else (lambda v: v), lambda v: v):
                num, den = _error_terms(_output(layer(x, *args, **kwargs)), t, "mse")
            loss = num / den
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    per_step = (time.perf_counter() - start) / a.steps
    params = sum(p.numel() * 4 for v in views for p in v.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"block {a.hidden}/{a.intermediate}, {a.batch} x {a.seqlen} tokens, {a.dtype}: views' parameters "
          f"{params / 2**20:.1f} MiB, saved for backward {sum(saved.values()) / 2**20:.1f} MiB, {per_step:.3f} s/step, "
          f"loss {float(loss.detach()):.6f}, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
