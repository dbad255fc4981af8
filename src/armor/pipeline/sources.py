"""Where a model's weights come from during pruning: memory, or a checkpoint read block by block.

The driver sees both through the same few calls, so whole-model and streamed runs are one code path:

* :class:`InMemorySource` — a model already in memory; it is pruned in place.
* :class:`CheckpointSource` — a Hugging Face folder with safetensors weights; the model is a skeleton on the
  ``meta`` device and holds real weights only for the part in use (the embeddings while the calibration inputs
  are captured, then one decoder block at a time).  The pruned model is written from the per-layer files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import (
    find_decoder_layers,
    get_module,
    model_device,
    restack_experts,
    set_module,
    stacked_experts,
    unfuse_experts,
)
from ..storage import ShardReader, meta_skeleton, read_armor_config, release_memory, save_pruned, save_pruned_streamed
from ..storage.checkpoint import check_covered, check_shapes, materialise, release, untie_distinct_head
from ..storage.conversion import checkpoint_view
from ..storage.hf_quantizer import install_packed_modules
from ..storage.resume import ModelDigests
from ..storage.writer import pruned_modules

__all__ = ["InMemorySource", "CheckpointSource", "ModelSource", "outer_keys"]


def outer_keys(model: nn.Module, prefix: str, with_head: bool = True) -> list[str]:
    """State-dict keys outside the decoder blocks; a tied head (the embedding matrix itself) never, an untied one
    only ``with_head``."""
    keys = [k for k in model.state_dict(keep_vars=True) if not k.startswith(prefix + ".")]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if with_head and not tied:
        return keys
    heads = [f"{mn}." for mn, mod in model.named_modules() if head is not None and mod is head and mn]
    return [k for k in keys if not any(k.startswith(h) for h in heads)]


def block_keys(model: nn.Module, prefix: str, index: int) -> list[str]:
    return [k for k in model.state_dict(keep_vars=True) if k.startswith(f"{prefix}.{index}.")]


def _prefixed(block: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {prefix + k: t.detach() for k, t in block.state_dict(keep_vars=True).items()}


class InMemorySource:
    """A model in memory.  Loading and releasing are no-ops; pruned modules replace the dense ones for good."""

    streamed = False

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch model or a checkpoint folder, got {type(model).__name__}")
        self.model = model
        # Mixture-of-experts blocks keep their experts as stacked 3-D parameters: one nn.Linear per expert matrix
        # (same forward, checked) lets each be pruned with the statistics of the tokens routed to it.  Only the
        # names are kept: holding the stacked modules would keep a second copy of every expert's weights.
        self._stacked = list(stacked_experts(model))
        try:
            unfuse_experts(model)
            self.prefix, self.blocks = find_decoder_layers(model)
        except ValueError:
            self.undo_unpruned()
            if pruned_modules(model):
                raise ValueError("the model is already pruned: its decoder blocks hold no nn.Linear left to prune; "
                                 "prune the dense model it was made from") from None
            raise
        self.device = model_device(model)

    def undo_unpruned(self) -> None:
        """Put back the stacked experts modules whose experts no pruned layer has replaced yet, rebuilt from their
        unchanged per-expert weights (a refused or failed run leaves the caller's model as it found it, as far as
        nothing in it was pruned)."""
        restack_experts(self.model, [name for name in self._stacked
                                     if not pruned_modules(get_module(self.model, name))])

    def layer_tensors(self, name: str) -> tuple[Tensor, Tensor | None]:
        lin = get_module(self.model, name)
        return lin.weight.detach(), None if lin.bias is None else lin.bias.detach()

    def outer_tensors(self) -> dict[str, Tensor]:
        """The tensors outside the decoder blocks (what :class:`~armor.storage.resume.ModelDigests` digests)."""
        state = self.model.state_dict(keep_vars=True)
        return {k: state[k].detach() for k in outer_keys(self.model, self.prefix)}

    def block_tensors(self, index: int) -> dict[str, Tensor]:
        """The tensors of one (loaded, still dense) decoder block under their model names."""
        return _prefixed(self.blocks[index], f"{self.prefix}.{index}.")

    read_block_tensors = block_tensors

    def digests(self) -> ModelDigests:
        """Digests of every tensor and the chain over the blocks (:class:`~armor.storage.resume.ModelDigests`)."""
        out = ModelDigests()
        out.add_outer(self.outer_tensors(), self.model.config)
        for i in range(len(self.blocks)):
            out.add_block(self.block_tensors(i))
        return out

    def load_embeddings(self) -> None:
        pass

    def release_embeddings(self) -> None:
        pass

    def load_block(self, index: int) -> nn.Module:
        return self.blocks[index]

    def release_block(self, index: int) -> None:
        pass

    def place(self, name: str, module: nn.Module) -> None:
        set_module(self.model, name, module.to(self.device))

    def save(
        self, out_dir: Path, specs: Mapping[str, dict], dtypes: Mapping[str, str], run_info: Mapping[str, Any],
        tokenizer: Any,
    ) -> Path:
        return save_pruned(self.model, out_dir, tokenizer=tokenizer, run_info=run_info)


class CheckpointSource:
    """A checkpoint folder read tensor by tensor; at most one decoder block (plus the embeddings while the
    calibration inputs are captured, or the embeddings and the head while they are used) holds real weights.

    A pruned folder works too (its packed layers are put in the skeleton from their specs): that is how a
    pruned model is evaluated block by block.  ``dtype`` casts floating-point weights (default: a dense checkpoint
    runs in the dtype that stores most of its values, a pruned folder's tensors keep their stored dtypes).
    """

    streamed = True

    def __init__(
        self, path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"not a model folder (no config.json): {self.path}")
        section = read_armor_config(self.path)
        self.pruned = section is not None
        self.model = meta_skeleton(self.path, strip_quantization=self.pruned)
        if not self.pruned and getattr(self.model.config, "quantization_config", None) is not None:
            raise ValueError(f"{self.path} is a quantized checkpoint; pruning needs plain float weights")
        self.prefix, self.blocks = find_decoder_layers(self.model)  # before packed modules replace the linears
        if self.pruned:
            install_packed_modules(
                self.model, section.get("layers", {}), section.get("layer_dtypes", {}), "meta",
                section.get("unfused_experts", ()),
            )
        self.raw = ShardReader(self.path)
        # a dense checkpoint is read under the model's keys, as from_pretrained maps them; its stacked experts are
        # unfused, one nn.Linear per expert matrix, as an in-memory run prunes them
        self.reader = self.raw if self.pruned else checkpoint_view(self.raw, self.model)
        check_shapes(self.model, self.reader)  # a config that does not belong to these weights fails now
        if not self.pruned:  # a tensor missing (random weights) or left over (a config with fewer layers)
            check_covered(self.model, self.reader, self.reader.unused, f"the weights in {self.path}")
        untie_distinct_head(self.model, self.reader, self.path)  # as from_pretrained loads it
        self.dtype = dtype if dtype is not None or self.pruned else self.reader.float_dtype() or torch.float32
        self.device = torch.device(device)
        head = self.model.get_output_embeddings()
        self._head = [f"{mn}." for mn, mod in self.model.named_modules() if head is not None and mod is head and mn]
        self._tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        self._outer_loaded: list[str] = []

    def _outer_keys(self, with_head: bool) -> list[str]:
        keys = [k for k in self.model.state_dict(keep_vars=True) if not k.startswith(self.prefix + ".")]
        if with_head and not self._tied:
            return keys
        # a tied head is the embedding matrix itself: re-tied after loading, never read twice
        return [k for k in keys if not any(k.startswith(h) for h in self._head)]

    def _read(self, keys: list[str]) -> dict[str, Tensor]:
        """``keys`` in the run's dtype: from the checkpoint, or the skeleton's computed buffers."""
        state = self.model.state_dict(keep_vars=True)
        out = self.reader.load([k for k in keys if k in self.reader], self.dtype)
        for k in keys:
            if k not in out:
                if state[k].is_meta:
                    raise KeyError(f"the checkpoint in {self.path} has no tensor {k!r}")
                out[k] = state[k].detach()
        return out

    def digests(self) -> ModelDigests:
        """As :meth:`InMemorySource.digests` gives for this model loaded whole, one part in memory at a time."""
        out = ModelDigests()
        out.add_outer(self._read(outer_keys(self.model, self.prefix)), self.model.config)
        for i in range(len(self.blocks)):
            out.add_block(self.read_block_tensors(i))
        return out

    def outer_tensors(self) -> dict[str, Tensor]:
        """The tensors outside the blocks while the embeddings are loaded: those in memory, and an untied head
        (which calibration does not load) read now."""
        state = self.model.state_dict(keep_vars=True)
        keys = outer_keys(self.model, self.prefix)
        held = {k: state[k].detach() for k in keys if not state[k].is_meta}
        return {**held, **self._read([k for k in keys if k not in held])}

    def block_tensors(self, index: int) -> dict[str, Tensor]:
        """The tensors of one loaded (still dense) decoder block under their model names."""
        return _prefixed(self.blocks[index], f"{self.prefix}.{index}.")

    def read_block_tensors(self, index: int) -> dict[str, Tensor]:
        """The tensors of one block read from the checkpoint (the block itself stays unloaded)."""
        return self._read(block_keys(self.model, self.prefix, index))

    def layer_tensors(self, name: str) -> tuple[Tensor, Tensor | None]:
        """The dense weight (and bias) of one layer, read from the checkpoint in the run's dtype."""
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if get_module(self.model, name).bias is not None else [])
        loaded = self.reader.load(keys, self.dtype)
        return loaded[keys[0]], loaded.get(f"{name}.bias")

    def load_embeddings(self, with_head: bool = False) -> None:
        """Everything outside the decoder blocks (the head only when ``with_head``)."""
        keys = self._outer_keys(with_head)
        self._outer_loaded = materialise(self.model, "", self.reader, self.dtype, self.device, keys=keys)
        if with_head and self._tied and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def undo_unpruned(self) -> None:
        """Nothing to undo: a streamed run changes only its own skeleton, never the checkpoint."""

    def release_embeddings(self) -> None:
        release(self.model, self._outer_loaded)
        if self._tied and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        self._outer_loaded = []
        release_memory()

    def load_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        materialise(block, f"{self.prefix}.{index}.", self.reader, self.dtype, self.device)
        return block

    def release_block(self, index: int) -> None:
        # Drops the block's weights (and any pruned modules placed in it) before the next block is loaded.
        self.blocks[index] = self.blocks[index].to("meta")
        release_memory()

    def place(self, name: str, module: nn.Module) -> None:
        set_module(self.model, name, module.to(self.device))

    def save(
        self, out_dir: Path, specs: Mapping[str, dict], dtypes: Mapping[str, str], run_info: Mapping[str, Any],
        tokenizer: Any,
    ) -> Path:
        return save_pruned_streamed(
            # the layer files are in out_dir/layers/, where the driver's jobs wrote them
            self.path, out_dir, specs, dtypes, run_info=run_info, tokenizer=tokenizer, dtype=self.dtype,
            reader=self.raw,
        )


ModelSource = InMemorySource | CheckpointSource
