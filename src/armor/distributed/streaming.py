"""Streaming calibration and pruning: one decoder block in memory at a time.

The model is built as a skeleton on the ``meta`` device (no weights).  Weights are read from the checkpoint's
safetensors shards when they are needed: first the parts outside the decoder blocks (embeddings, rotary
tables, ...) for one pass that only captures what the first block receives, then one block at a time.

1. **Capture.**  Every decoder block's ``forward`` is temporarily replaced by a catcher that records its call:
   the first block's hidden states (the calibration activations) and, for every block, the keyword arguments
   the model passes it (attention mask, position embeddings, ...).  Recording them per block keeps models
   whose blocks get different masks (Qwen2/Mistral sliding-window layers) right.  The pass stops at the last
   block needed, so neither the final norm nor ``lm_head`` is ever loaded.
2. **Per block.**  Load the block, run it over the stored activations with forward hooks that accumulate the
   statistics of its selected linear layers, hand the layers to the executor (in process or Ray), and pass the
   block's outputs on as the next block's inputs.  ``one-pass`` (ARMOR's protocol, ALGORITHM.md §1): outputs
   of the dense block, so every statistic is the dense model's, exactly as in the whole-model run, and the
   pruning of block ``i`` never holds up block ``i + 1``.  ``sequential`` (as SparseGPT/Wanda run): the block
   is pruned first and its outputs are computed with the pruned layers, so later statistics see earlier
   pruning.
3. **Save.**  The pruned model is written in the folder format of :func:`armor.model.save_pruned`, one tensor
   at a time, from the per-layer result files and the checkpoint's dense tensors.

Activations live in memory up to a budget, beyond it in files in a temporary folder.  Per-layer results land
in ``<out>/layers/<name>.safetensors`` with the same fingerprints as the whole-model run, so either resumes
the other (one-pass only: sequential statistics differ and get their own fingerprint).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..model.layers import find_decoder_layers, find_prunable_layers, set_module
from ..model.pipeline import armor_section
from ..model.prune import LayerRecord, PruneRun, layer_file, load_layer_file
from ..solvers import METHOD_NEEDS
from ..stats import LayerStats, StatsAccumulator
from .jobs import (
    Executor,
    LayerJob,
    LayerOutcome,
    LocalExecutor,
    ResultCollector,
    _outcome,
    layer_fingerprint,
)

__all__ = [
    "CALIBRATION_MODES",
    "ShardReader",
    "ActivationStore",
    "prune_streaming",
    "save_streamed_model",
    "streaming_fingerprint",
]

#: ``one-pass``: all statistics from the dense model; ``sequential``: from the model pruned so far.
CALIBRATION_MODES = ("one-pass", "sequential")


def streaming_fingerprint(calib_digest: str, calibration_mode: str) -> str:
    """Resume fingerprint of the calibration: one-pass results equal the whole-model run's and share its
    fingerprint; sequential ones are different results and must never be mixed with them."""
    if calibration_mode not in CALIBRATION_MODES:
        raise ValueError(
            f"calibration mode must be one of {', '.join(CALIBRATION_MODES)}, got {calibration_mode!r}"
        )
    return calib_digest if calibration_mode == "one-pass" else f"{calib_digest}:sequential"


# ------------------------------------------------------------------------------------------------ weights
class ShardReader:
    """Tensors of a Hugging Face checkpoint folder, read on demand from its safetensors file(s).

    Each read opens the shard, copies the tensors out and closes it, so no memory map outlives the read and
    the process's resident memory only holds what was asked for.
    """

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.folder / f for k, f in weight_map.items()}
        else:
            shards = [p for p in sorted(self.folder.glob("*.safetensors")) if p.name != "armor.safetensors"]
            for p in shards:
                with safe_open(str(p), framework="pt", device="cpu") as f:
                    self.files.update({k: p for k in f.keys()})  # noqa: SIM118 - safe_open has no iteration
        if not self.files:
            raise FileNotFoundError(
                f"streaming needs safetensors weights, and {self.folder} has none "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def load(
        self, keys: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]:
        """The tensors ``keys``; floating-point ones cast to ``dtype`` (as ``from_pretrained(dtype=...)``
        does)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.files:
                raise KeyError(f"tensor {k!r} is not in the checkpoint {self.folder}")
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, Tensor] = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in names:
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[k] = t.to(device)
        return out


def _set_tensor(root: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer at dotted path ``name`` (e.g. a meta placeholder)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def _materialise(
    root: nn.Module, prefix: str, keys: Sequence[str], reader: ShardReader, dtype: torch.dtype, device: Any
) -> list[str]:
    """Load the state-dict entries ``keys`` of ``root`` (full names ``prefix + key``) from the checkpoint.

    Buffers that the checkpoint does not hold but that are already real (computed at construction, such as
    rotary frequencies) are kept.  Returns the keys that were loaded.
    """
    state = root.state_dict(keep_vars=True)
    wanted = [k for k in keys if prefix + k in reader]
    missing = [k for k in keys if prefix + k not in reader and state[k].is_meta]
    if missing:
        raise KeyError(
            f"the checkpoint has no tensor {prefix + missing[0]!r} (and {len(missing) - 1} more); "
            "streaming needs checkpoint names equal to the model's parameter names"
        )
    loaded = reader.load([prefix + k for k in wanted], dtype, device)
    for k in wanted:
        _set_tensor(root, k, loaded.pop(prefix + k))
    return wanted


def _release_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc only; elsewhere a no-op).

    Streaming frees a block's weights and activations and allocates the next block's of about the same sizes;
    glibc keeps such freed chunks in its arenas, so without a trim the resident size creeps up block after
    block (measured on SmolLM2: +40 MiB per block) although nothing is alive.  Cyclic garbage (modules,
    results) is collected first so that its tensors are among what gets handed back.
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc: nothing to trim
        pass


def _to_meta(root: nn.Module, keys: Iterable[str]) -> None:
    state = root.state_dict(keep_vars=True)
    for k in keys:
        _set_tensor(root, k, torch.empty_like(state[k], device="meta"))


# ------------------------------------------------------------------------------------------- activations
class ActivationStore:
    """Per-batch tensors: in memory up to ``budget_bytes`` in all, the rest in files under ``folder``."""

    def __init__(self, budget_bytes: int, folder: Path) -> None:
        self.budget = max(0, int(budget_bytes))
        self.folder = folder
        self._items: list[Tensor | Path] = []
        self.mem_bytes = 0
        self.disk_bytes = 0

    def append(self, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self.mem_bytes + nbytes <= self.budget:
            self._items.append(t)
            self.mem_bytes += nbytes
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="act-", suffix=".safetensors", dir=self.folder)
        os.close(fd)
        save_file({"x": t}, name)
        self._items.append(Path(name))
        self.disk_bytes += nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Tensor:
        item = self._items[i]
        if isinstance(item, Tensor):
            return item
        from safetensors import safe_open

        with safe_open(str(item), framework="pt", device="cpu") as f:
            return f.get_tensor("x")

    def close(self) -> None:
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items.clear()
        self.mem_bytes = self.disk_bytes = 0


# ------------------------------------------------------------------------------------------------ capture
class _StopForward(Exception):
    pass


@torch.no_grad()
def _capture(
    model: nn.Module, blocks: nn.ModuleList, last: int, input_ids: Tensor, batch_size: int, device: Any,
    store: ActivationStore, progress: bool,
) -> list[dict[tuple[int, ...], tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Run the model's forward up to block ``last`` with every block replaced by a recorder.

    Returns, per block, ``{hidden_states.shape: (extra positional args, keyword args)}`` as the model called
    it; the first block's inputs go to ``store``.  Calibration batches carry no padding, so the call arguments
    depend only on the batch's shape and one record per shape serves every batch.
    """
    from tqdm.auto import tqdm

    calls: list[dict[tuple[int, ...], tuple[tuple[Any, ...], dict[str, Any]]]] = [{} for _ in blocks]

    def recorder(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                store.append(hidden)
            calls[i].setdefault(tuple(hidden.shape), (rest, dict(kwargs)))
            if i == last:
                raise _StopForward
            return hidden  # blocks after the first only need their call arguments, not real inputs

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # instance attribute: shadows the class's forward for this pass only
    try:
        starts = range(0, input_ids.shape[0], batch_size)
        for s in tqdm(starts, desc="capture", unit="batch", disable=not progress, leave=False):
            try:
                model(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model's forward finished without calling its last decoder block")
    finally:
        for block in blocks:
            del block.forward
    return calls


class _BlockStats:
    """Forward hooks that accumulate the input statistics of a block's selected layers.

    Layers called one after another on the very same tensor (q/k/v, gate/up) share one accumulator, as in
    :func:`armor.model.collect_stats`; their statistics are identical anyway.
    """

    def __init__(self, layers: Mapping[str, nn.Linear], full: bool) -> None:
        self.full = full
        self.accs: dict[str, StatsAccumulator] = {}
        self.owner: dict[str, str] = {}
        self._last: tuple[Any, str] | None = None
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in layers.items()]
        self.names = list(layers)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0]
            if name not in self.owner:
                if self._last is not None and self._last[0] is x:
                    self.owner[name] = self.owner[self._last[1]]
                else:
                    self.owner[name] = name
                    self.accs[name] = StatsAccumulator(mod.in_features, full=self.full, device=x.device)
            if self.owner[name] == name:
                self.accs[name].update(x)
            self._last = (x, name)

        return hook

    def new_batch(self) -> None:
        self._last = None

    def finish(self) -> dict[str, LayerStats]:
        for h in self._handles:
            h.remove()
        self._last = None
        missing = [n for n in self.names if n not in self.owner]
        if missing:
            raise RuntimeError(f"layers never called by their block's forward: {', '.join(missing[:5])}")
        finals = {n: acc.finalize() for n, acc in self.accs.items()}
        return {n: finals[self.owner[n]] for n in self.names}


@torch.no_grad()
def _run_block(
    block: nn.Module,
    calls: Mapping[tuple[int, ...], tuple[tuple[Any, ...], dict[str, Any]]],
    inputs: ActivationStore,
    outputs: ActivationStore | None,
    device: Any,
    stats: _BlockStats | None = None,
) -> None:
    for j in range(len(inputs)):
        x = inputs[j].to(device)
        rest, kwargs = calls[tuple(x.shape)]
        if stats is not None:
            stats.new_batch()
        y = block(x, *rest, **kwargs)
        if outputs is not None:
            outputs.append(y[0] if isinstance(y, (tuple, list)) else y)


# ----------------------------------------------------------------------------------------------- pruning
def _skeleton(model_path: str | Path) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{model_path} is a quantized checkpoint; streaming needs plain float weights")
    # Parameters on meta; buffers (rotary frequencies) real, as they are computed, not stored.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # on meta, from_config leaves tied parameters as separate placeholders
    return model.eval()


def prune_streaming(
    model_path: str | Path,
    calib_ids: Tensor,
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    out_dir: str | Path,
    tokenizer: Any = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    calibration_mode: str = "one-pass",
    batch_size: int = 8,
    n: int = 2,
    m: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    resume: bool = True,
    executor: Executor | None = None,
    activation_budget: int = 2 << 30,
    offload_dir: str | Path | None = None,
    extra_config: Mapping[str, Any] | None = None,
    callback: Callable[[str, LayerRecord], None] | None = None,
    progress: bool = True,
) -> PruneRun:
    """Calibrate and prune the checkpoint in ``model_path`` holding one decoder block at a time; save the
    pruned model to ``out_dir`` (loadable with :func:`armor.load`).

    Args:
        calib_ids: ``(nsamples, seqlen)`` calibration token ids (no padding).
        calibration_mode: ``"one-pass"`` (statistics of the dense model; per-layer results identical to
            :func:`armor.model.prune_pretrained` on the same data) or ``"sequential"`` (statistics of the
            model pruned so far).
        dtype: dtype the weights are loaded and pruned in (the whole-model CLI loads float32).
        device: where blocks run their calibration forward.
        executor: runs the layer jobs (default: in process; :class:`~armor.distributed.RayExecutor` for Ray).
        activation_budget: bytes of block inputs + outputs kept in memory; the rest goes to files in
            ``offload_dir`` (default ``<out_dir>/.activations``), removed at the end.
        extra_config: merged into the saved ``"armor"`` config section, as in ``prune_pretrained``.
    """
    from ..model.pipeline import ids_digest

    if method not in METHOD_NEEDS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NEEDS)}")
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calib_ids must be a non-empty (nsamples, seqlen) tensor, got "
                         f"{tuple(calib_ids.shape)}")
    calib_fp = ids_digest(calib_ids)
    run_fp = streaming_fingerprint(calib_fp, calibration_mode)
    sequential = calibration_mode == "sequential"
    options = dict(options or {})
    executor = executor or LocalExecutor()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # a half-updated folder must never look finished
    act_dir = Path(offload_dir) if offload_dir is not None else out / ".activations"
    act_dir = act_dir / f"run-{os.getpid()}-{time.time_ns()}"
    start = time.perf_counter()

    model = _skeleton(model_path)
    reader = ShardReader(model_path)
    prefix, blocks = find_decoder_layers(model)
    layers = find_prunable_layers(model, include, exclude, m=m)
    by_block: dict[int, list[str]] = {}
    for name in layers:
        by_block.setdefault(int(name[len(prefix) + 1 :].split(".", 1)[0]), []).append(name)
    last = max(by_block)
    needs = METHOD_NEEDS[method]

    # Everything outside the blocks except the output head: what the forward needs before the first block.
    head = model.get_output_embeddings()
    head_names = {f"{mn}." for mn, mod in model.named_modules() if head is not None and mod is head and mn}
    outer = [k for k in model.state_dict(keep_vars=True)
             if not k.startswith(prefix + ".") and not any(k.startswith(h) for h in head_names)]
    budget = activation_budget // 2  # inputs and outputs of one block are alive together
    inputs = ActivationStore(budget, act_dir)
    collector = ResultCollector(list(layers), method, out, callback=callback, progress=progress)
    finished: dict[str, LayerOutcome] = {}  # sequential mode: this block's outcomes, to run the pruned block
    outputs: ActivationStore | None = None

    def take(outcome: LayerOutcome) -> None:
        collector.accept(outcome)
        if sequential:
            finished[outcome.name] = outcome

    try:
        loaded = _materialise(model, "", outer, reader, dtype, device)
        calls = _capture(model, blocks, last, calib_ids, batch_size, device, inputs, progress)
        _to_meta(model, loaded)
        _release_memory()

        for i in range(last + 1):
            block = blocks[i]
            bprefix = f"{prefix}.{i}."
            keys = list(block.state_dict(keep_vars=True))
            _materialise(block, bprefix, keys, reader, dtype, device)
            names = by_block.get(i, [])
            blayers = {name: model.get_submodule(name) for name in names}
            fps = {nm: layer_fingerprint(lin.weight, method, options, n, m, run_fp)
                   for nm, lin in blayers.items()}
            collector.add_fingerprints(fps)
            collector.bar.set_description(f"prune {method} [block {i + 1}/{last + 1}]")

            done: dict[str, LayerOutcome] = {}
            for name in names:
                path = layer_file(out, name)
                if not resume:
                    path.unlink(missing_ok=True)
                    continue
                got = load_layer_file(path, name, fps[name], device=device)
                if got is not None:
                    done[name] = _outcome(name, got[0], got[1], reused=True, written=False)
            todo = [name for name in names if name not in done]

            hooks = _BlockStats({k: blayers[k] for k in todo}, full=needs == "full") \
                if todo and needs != "nothing" else None
            want_out = i < last
            outputs = ActivationStore(budget, act_dir) if want_out else None
            if hooks is not None or (want_out and not sequential):
                # one-pass: the dense outputs come out of the statistics pass itself
                _run_block(block, calls[i], inputs, None if sequential else outputs, device, hooks)
            stats = hooks.finish() if hooks is not None else {}
            _release_memory()  # the forward's scratch (attention scores, MLP activations) before the solver's

            for name in names:
                if name in done:
                    take(done[name])
            for name in todo:
                while executor.pending >= executor.window:
                    for o in executor.results(until_pending=executor.window - 1):
                        take(o)
                lin = blayers[name]
                executor.submit(LayerJob(
                    name=name, weight=lin.weight.detach(),
                    bias=None if lin.bias is None else lin.bias.detach(), stats=stats.get(name),
                    method=method, options=options, fingerprint=fps[name], n=n, m=m, out_dir=str(out),
                    resume=resume,
                ))
                for o in executor.results(until_pending=executor.pending):
                    take(o)
            del stats

            if sequential and want_out:
                # The pruned block computes the next block's inputs: wait for its layers.
                for o in executor.results(until_pending=0):
                    take(o)
                for name in names:
                    set_module(model, name, finished.pop(name).module(device))
                _run_block(block, calls[i], inputs, outputs, device)
            finished.clear()
            blocks[i] = block.to("meta")  # drop the block's weights (and pruned modules) before the next one
            del blayers
            inputs.close()
            if outputs is not None:
                inputs = outputs
            _release_memory()
        for o in executor.results(until_pending=0):
            take(o)
        records = collector.finish()
    finally:
        collector.close()
        inputs.close()
        if outputs is not None:
            outputs.close()
        shutil.rmtree(act_dir, ignore_errors=True)
        if offload_dir is None:
            try:
                (out / ".activations").rmdir()
            except OSError:
                pass
    seconds = time.perf_counter() - start

    section = armor_section(
        method, options, n, m, include, exclude, calib_ids, calib_fp, extra_config, records, seconds,
        calibration={"mode": calibration_mode}, streaming=True,
    )
    save_streamed_model(model_path, out, collector.specs, collector.dtypes, section, tokenizer=tokenizer,
                        dtype=dtype, reader=reader)
    resumed = sum(r.resumed for r in records)
    return PruneRun(method, options, records, dict(collector.specs), seconds, resumed)


# -------------------------------------------------------------------------------------------------- save
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors_streamed(
    path: Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]],
    metadata: Mapping[str, str],
) -> None:
    """Write a safetensors file holding one tensor in memory at a time (the format is an 8-byte header length,
    a JSON header with every tensor's dtype, shape and byte range, then the raw bytes in that order).

    Goes through a temporary file, fsync and rename, like :func:`armor.model.prune.atomic_save_safetensors`.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, shape, dt, _ in entries:
        if dt not in _ST_DTYPES:
            raise TypeError(f"cannot store {key} of dtype {dt} in safetensors")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
        header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dt, load in entries:
                t = load()
                if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                    raise ValueError(f"{key}: expected {tuple(shape)} {dt}, got {tuple(t.shape)} {t.dtype}")
                t = t.detach().to("cpu").contiguous()
                if t.numel():  # through the buffer protocol: no second copy of a large tensor
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                big = t.numel() * t.element_size() > 16 << 20
                del t
                if big:
                    _release_memory()
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_streamed_model(
    model_path: str | Path,
    out_dir: str | Path,
    specs: Mapping[str, dict[str, Any]],
    dtypes: Mapping[str, str],
    armor_config: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    reader: ShardReader | None = None,
) -> Path:
    """Write the folder :func:`armor.model.save_pruned` writes, without the model in memory: pruned layers
    come from ``<out>/layers/``, every other tensor from the checkpoint (floating point cast to ``dtype``).
    ``config.json`` is written last, so a killed save never looks finished.
    """
    from safetensors import safe_open

    from ..model.io import MODEL_FORMAT, WEIGHTS_NAME, library_versions, plain_config_dict, write_json_atomic
    from ..runtime import empty_module_from_spec

    out = Path(out_dir)
    reader = reader or ShardReader(model_path)
    model = _skeleton(model_path)
    for name, spec in specs.items():
        empty = empty_module_from_spec(spec, dtype=getattr(torch, dtypes[name]), device="meta")
        set_module(model, name, empty)
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}  # tied parameters appear under several names: one tensor, aliases
    for key, t in state.items():
        groups.setdefault(id(t), []).append(key)

    def from_layer(name: str, sub: str) -> Callable[[], Tensor]:
        def load() -> Tensor:
            with safe_open(str(layer_file(out, name)), framework="pt", device="cpu") as f:
                return f.get_tensor(sub)

        return load

    def from_checkpoint(key: str) -> Callable[[], Tensor]:
        return lambda: reader.load([key], dtype)[key]

    entries = []
    aliases: dict[str, str] = {}
    for keys in groups.values():
        key, t = keys[0], state[keys[0]]
        aliases.update({k: key for k in keys[1:]})
        parent, _, sub = key.rpartition(".")
        if parent in specs:
            load = from_layer(parent, sub)
            dt = t.dtype
        else:
            src = next((k for k in keys if k in reader), None)
            if src is not None:
                load = from_checkpoint(src)
                dt = dtype if t.is_floating_point() else t.dtype
            elif not t.is_meta:  # a persistent buffer computed at construction
                load, dt = (lambda t=t: t), t.dtype
            else:
                raise KeyError(f"the checkpoint in {model_path} has no tensor for {key}")
        entries.append((key, tuple(t.shape), dt, load))
    (out / "config.json").unlink(missing_ok=True)
    meta = {"format": MODEL_FORMAT, "aliases": json.dumps(aliases)}
    _write_safetensors_streamed(out / WEIGHTS_NAME, entries, meta)

    section = {**dict(armor_config), "format": MODEL_FORMAT, "weights": WEIGHTS_NAME}
    section.update({"layers": dict(specs), "layer_dtypes": dict(dtypes), "versions": library_versions()})
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(model_path, local_files_only=True).save_pretrained(out)
    except Exception:  # no (valid) generation config: not worth failing the save for, as in save_pruned
        pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg = plain_config_dict(model.config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["armor"] = section
    write_json_atomic(cfg, out / "config.json")
    return out
