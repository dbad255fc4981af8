"""The ``armor`` command on a tiny random Llama: prune (whole-model, streamed, sequential, Ray), inspect, export,
eval, and the one-line errors a user gets for bad input."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from armor.cli import main
from armor.report import DENSE_FOOTPRINT, format_table, result_row
from armor.storage import read_armor_config
from armor.storage.resume import layer_file
from conftest import run_cli

_cli = run_cli


def _small(model_dir, text, out, *extra):
    return [
        "prune", "--model", model_dir, "--calib-text", text, "--eval-text", text, "--nsamples", 8, "--seqlen", 48,
        "--eval-seqlen", 48, "--eval-windows", 3, "--output", out, "--quiet", "--reconstruct-steps", 3,
        "--reconstruct-holdout", 4, *extra,
    ]


def test_prune_inspect_export_eval(capsys, tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = _cli(
        capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "armor-fast", "--compare", "nowag,magnitude",
                        "-O", "sweeps=1", "--block-size", 16)
    )
    assert rc == 0, err
    assert "| dense |" in stdout and "| armor-fast |" in stdout and "| nowag |" in stdout
    assert (out / "report.md").is_file() and (out / "loss_per_layer.png").is_file()
    assert not (out / "armor-fast" / "layers").exists()  # resume files removed once the model is saved
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["dense", "nowag", "magnitude", "armor-fast"]
    assert all(math.isfinite(r["ppl"]) for r in results)
    nowag = next(r for r in results if r["method"] == "nowag")
    armor_row = next(r for r in results if r["method"] == "armor-fast")
    # bytes next to every perplexity: a 2:4 layer stores half the values plus 2-bit positions
    assert nowag["values_kept_ratio"] == pytest.approx(0.5) and nowag["wrapper_overhead"] == 0
    assert 0.5 < nowag["linear_bytes_ratio"] < 0.6
    assert armor_row["wrapper_overhead"] > 0 and armor_row["linear_bytes_ratio"] > nowag["linear_bytes_ratio"]
    report = (out / "report.md").read_text()
    assert "linear bytes / dense" in report and "| 16, 16 |" in report  # the block sizes actually used
    # reconstruction is on by default, for every method, with each block's errors in the report and results
    assert report.count("block-wise reconstruction") == 3 and "| down_proj |" in report
    assert stdout.count("  reconstruction: ") == 3 and "held-out output error" in stdout
    assert all(len(r["reconstruction"]["blocks"]) == 2 for r in results if r["method"] != "dense")

    rc, stdout, _ = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "armor-fast", "--compare",
                                         "none", "-O", "sweeps=1", "--block-size", 16, "--no-dense-eval"))
    assert rc == 0 and "already pruned" in stdout
    # --no-dense-eval: the pruned model is evaluated, the dense one is not
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["armor-fast"] and math.isfinite(results[0]["ppl"])
    assert "dense:" not in stdout

    rc, stdout, _ = _cli(capsys, "inspect", out / "armor-fast", "--layers")
    assert rc == 0 and "method:        armor-fast" in stdout and "model.layers.1.mlp.down_proj" in stdout
    assert "block sizes:   16x16" in stdout and "footprint:" in stdout
    rc, stdout, _ = _cli(capsys, "export", out / "armor-fast", tmp_path / "dense")
    assert rc == 0 and (tmp_path / "dense" / "model.safetensors").is_file()
    rc, _, err = _cli(capsys, "export", out / "armor-fast", tmp_path / "dense")
    assert rc == 2 and "not empty" in err  # never over a folder that holds something
    for folder in (out / "armor-fast", tmp_path / "dense"):
        rc, stdout, err = _cli(capsys, "eval", folder, "--eval-text", tiny_text, "--eval-seqlen", 48,
                               "--eval-windows", 2)
        assert rc == 0 and "perplexity" in stdout, err


def test_streaming_sequential_and_ray(capsys, tiny_model_dir, tiny_text, tmp_path):
    pytest.importorskip("ray")
    common = ["--method", "wanda", "--compare", "none", "--keep-layers"]
    rc, out_whole, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "whole", *common))
    assert rc == 0, err
    rc, out_stream, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "stream", *common, "--streaming"))
    assert rc == 0, err
    section = read_armor_config(tmp_path / "stream" / "wanda")
    assert section["streamed"] and section["calibration"]["mode"] == "one-pass"
    whole = read_armor_config(tmp_path / "whole" / "wanda")
    assert [r["loss"] for r in whole["records"]] == [r["loss"] for r in section["records"]]
    # the streamed run evaluates block by block and gets the same perplexity
    ppl = [json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("whole", "stream")]
    assert ppl[0][1]["ppl"] == pytest.approx(ppl[1][1]["ppl"], rel=1e-6)

    # sequential works for both sources; a finished one-pass folder is not taken for a sequential one
    for extra in ([], ["--streaming"]):
        rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "stream", *common, *extra,
                                               "--calibration-mode", "sequential"))
        assert rc == 0, err
        assert read_armor_config(tmp_path / "stream" / "wanda")["calibration"]["mode"] == "sequential"
    assert "already pruned" in stdout

    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "ray", *common, "--workers", 2))
    assert rc == 0, err
    for rec in whole["records"]:
        with safe_open(str(layer_file(tmp_path / "whole" / "wanda", rec["name"])), "pt") as a, \
                safe_open(str(layer_file(tmp_path / "ray" / "wanda", rec["name"])), "pt") as b:
            assert a.metadata()["fingerprint"] == b.metadata()["fingerprint"]
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_other_nm_patterns_from_the_command_line(capsys, tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "o"
    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "armor-fast", "--compare",
                                           "magnitude", "-O", "sweeps=1", "--n", 1, "--m", 8, "--no-eval"))
    assert rc == 0, err
    for method in ("magnitude", "armor-fast"):
        specs = read_armor_config(out / method)["layers"]
        assert specs and all((s["n"], s["m"]) == (1, 8) for s in specs.values())
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["pattern"] == "1:8"
    magnitude = next(r for r in results["results"] if r["method"] == "magnitude")
    assert magnitude["values_kept_ratio"] == pytest.approx(1 / 8)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "bogus"], "unknown method 'bogus'"),
        (["--compare", "nowag,bogus2"], "unknown method 'bogus2'"),
        (["--seqlen", "100000"], "--seqlen 100000 is longer than the model's max_position_embeddings (256)"),
        (["--eval-seqlen", "100000"], "--eval-seqlen 100000 is longer than the model's max_position_embeddings"),
        (["--nsamples", "0"], "--nsamples must be > 0"),
        (["--layers", "no_such_layer"], "no prunable layers selected"),
        (["-O", "sweeps"], "NAME=VALUE"),
        (["--method", "nowag", "--compare", "none", "-O", "sweeps=2"], "option 'sweeps' is not taken by nowag"),
        (["-O", "sweeps=many"], "option 'sweeps' must be an integer, got"),
        (["--method", "nowag", "--compare", "none", "--block-size", "16"], "option 'block_size' is not taken"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--n", "4", "--m", "4"], "--n must be smaller than --m"),
    ],
)
def test_errors_are_one_line(capsys, tiny_model_dir, tiny_text, tmp_path, extra, needle):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", *extra))
    assert rc == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))


def test_errors_name_bad_paths_and_folders(capsys, tiny_model_dir, tiny_text, tmp_path):
    rc, _, err = _cli(capsys, "prune", "--model", tmp_path / "missing-model")
    assert rc == 2 and "model path not found" in err and "missing-model" in err
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tmp_path / "nope.txt", tmp_path / "o"))
    assert rc == 2 and "nope.txt" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, empty, tmp_path / "o"))
    assert rc == 2 and "empty" in err and "empty.txt" in err
    rc, _, err = _cli(capsys, "inspect", tiny_model_dir)
    assert rc == 2 and "not an armor-pruned model" in err
    rc, _, err = _cli(capsys, "export", tmp_path / "nothing", tmp_path / "x")
    assert rc == 2 and "nothing" in err
    rc, _, err = _cli(capsys, "eval", tmp_path / "nothing")
    assert rc == 2 and "model path not found" in err
    # an output folder that holds something else is refused, untouched
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, busy, "--method", "nowag", "--compare", "none"))
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]


def test_corrupt_weights_are_a_clear_error(capsys, tiny_model_dir, tiny_text, tmp_path):
    weights = Path(tiny_model_dir) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", "--method", "nowag", "--compare",
                                      "none"))
    assert rc == 2 and "model.safetensors" in err and ("truncated" in err or "damaged" in err)
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o2", "--method", "nowag", "--compare",
                                      "none", "--streaming"))
    assert rc == 2 and "model.safetensors" in err and "Traceback" not in err


@pytest.mark.parametrize("streaming", [False, True])
def test_a_16_bit_model_is_pruned_and_saved_in_its_own_dtype(capsys, char_tokenizer, tiny_text, tmp_path, streaming):
    """Without --dtype a run computes and saves in the dtype that stores the model (most Hugging Face models are
    16-bit): the pruned checkpoint is smaller than the dense one, and its bytes are counted against it."""
    from safetensors import safe_open

    from conftest import make_tiny_model

    dense = tmp_path / "bf16-model"
    make_tiny_model(len(char_tokenizer)).to(torch.bfloat16).save_pretrained(dense)
    char_tokenizer.save_pretrained(dense)
    out = tmp_path / "out"
    extra = ["--method", "nowag", "--compare", "none", *(["--streaming"] if streaming else [])]
    rc, _, err = _cli(capsys, *_small(dense, tiny_text, out, *extra))
    assert rc == 0, err
    run = json.loads((out / "results.json").read_text())
    assert run["settings"]["dtype"] == "bfloat16"
    row = next(r for r in run["results"] if r["method"] == "nowag")
    assert row["checkpoint_bytes_ratio"] < 1 and 0.5 < row["linear_bytes_ratio"] < 0.6
    with safe_open(out / "nowag" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.values").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    rc, _, err = _cli(capsys, *_small(dense, tiny_text, tmp_path / "out32", *extra, "--dtype", "float32"))
    assert rc == 0 and json.loads((tmp_path / "out32" / "results.json").read_text())["settings"]["dtype"] == "float32"


def test_an_in_process_command_leaves_the_callers_transformers_settings(capsys, tiny_model_dir, monkeypatch):
    """The command silences transformers while it runs (its own workers included), then puts back what the caller
    had: an application that calls ``main()`` keeps its own verbosity, progress bars and environment."""
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        rc, _, err = _cli(capsys, "inspect", tiny_model_dir)
        assert rc == 2 and "not an armor-pruned model" in err
        assert "TRANSFORMERS_VERBOSITY" not in os.environ
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
        monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "debug")
        _cli(capsys, "inspect", tiny_model_dir)
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "debug"
    finally:
        hf_logging.set_verbosity_warning()


def test_help_has_no_doubled_none_and_lists_methods(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "--eval-windows" in text
    rc, stdout, _ = _cli(capsys, "prune", "--help-methods")
    assert rc == 0 and "column_batch=128" in stdout and "sweeps=20" in stdout and "armor-bh" in stdout
    assert "total time" not in stdout and "4 x the calibration batches" in stdout


def test_result_rows_and_table():
    """A row carries the perplexity and the task accuracies of its evaluation as columns, then the measures; the
    table shows a column per task and a dash where a row has no value."""
    evaluation = {"perplexity": {"ppl": 12.5}, "tasks": {"quiz": {"acc": 0.75, "acc_stderr": 0.1, "samples": 8}}}
    dense = result_row("dense", evaluation, **DENSE_FOOTPRINT)
    pruned = result_row("nowag", {}, mean_loss=0.0632, linear_bytes_ratio=0.531)
    assert dense["ppl"] == 12.5 and dense["quiz/acc"] == 0.75 and "quiz/acc_stderr" not in dense
    assert dense["evaluation"] == evaluation and dense["linear_bytes_ratio"] == 1.0
    assert pruned["ppl"] is None and pruned["mean_loss"] == 0.0632
    table = format_table([dense, pruned]).splitlines()
    assert table[0].startswith("| method | ppl | quiz/acc | linear bytes / dense |")
    assert table[2].startswith("| dense | 12.50 | 0.750 | 100.0% | 100.0% | 100.0% | 0.0% |")
    assert table[3].startswith("| nowag | – | – | 53.1% | – |") and "| 0.0632 |" in table[3]


def test_a_moe_checkpoint_streams_with_its_evaluation(capsys, char_tokenizer, tiny_text, tmp_path):
    """`armor prune --streaming` of a Mixtral checkpoint as transformers saves it (per-expert matrices under
    block_sparse_moe): each expert pruned, the same layers, losses and block-by-block perplexity as the in-memory
    run."""
    import transformers as tf

    config = tf.MixtralConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model_dir = tmp_path / "mixtral"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    common = ["--method", "wanda", "--compare", "none"]
    runs = {}
    for name, extra in (("whole", []), ("stream", ["--streaming"])):
        rc, _, err = _cli(capsys, *_small(model_dir, tiny_text, tmp_path / name, *common, *extra))
        assert rc == 0, err
        runs[name] = read_armor_config(tmp_path / name / "wanda")
    assert runs["stream"]["streamed"] and runs["stream"]["unfused_experts"] == runs["whole"]["unfused_experts"]
    assert "model.layers.1.mlp.experts.down_proj.3" in runs["stream"]["layers"]
    assert [r["loss"] for r in runs["whole"]["records"]] == [r["loss"] for r in runs["stream"]["records"]]
    ppl = [json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("whole", "stream")]
    assert ppl[0][1]["ppl"] == pytest.approx(ppl[1][1]["ppl"], rel=1e-6)


_HEAP_PROBE = """
import ctypes, sys
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):  # glibc before 2.33, or not glibc
    print("skip")
    sys.exit(0)
libc.mallinfo2.restype = MallInfo2
for _ in range(3):  # freed mapped blocks: glibc's own threshold rises past their size
    t = torch.empty(2 << 20, dtype=torch.uint8)
    t.fill_(1)
    del t
before = libc.mallinfo2().hblkhd
held = torch.empty(2 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_armors_heap_tunables_serve_large_tensors_from_their_own_mappings():
    """glibc raises its mmap threshold as mapped blocks are freed, after which MiB-sized tensors come from a heap
    that fragments (a whole-model MoE run's resident memory was twice what it held).  glibc ignores a misspelt
    tunable without a word: this checks that armor's string takes effect."""
    import subprocess

    from armor.heap import TUNABLES

    mapped = {}
    for how, extra in (("armor", {"GLIBC_TUNABLES": TUNABLES}), ("glibc", {})):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_")}
        proc = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True,
                              env={**env, **extra})
        assert proc.returncode == 0, proc.stderr[-2000:]
        last = proc.stdout.strip().splitlines()[-1]
        if last == "skip":
            pytest.skip("no glibc mallinfo2")
        mapped[how] = int(last)
    assert mapped["armor"] >= 2 << 20  # its own mapping, returned to the system when freed
    assert mapped["glibc"] == 0  # from the heap


def test_heap_tunables_keep_the_users_choice_and_need_huge_pages(tmp_path, monkeypatch):
    import armor.heap as heap

    thp = tmp_path / "enabled"
    monkeypatch.setattr(heap, "_THP", thp)
    monkeypatch.setattr(heap, "_is_glibc", lambda: True)
    monkeypatch.setattr(heap.sys, "platform", "linux")
    thp.write_text("always [madvise] never\n")
    assert heap.heap_tunables({}) == heap.TUNABLES
    assert heap.heap_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None  # theirs is kept
    assert heap.heap_tunables({"MALLOC_MMAP_THRESHOLD_": "65536"}) is None
    thp.write_text("always madvise [never]\n")  # 4 KiB faults: the fixed threshold would cost time
    assert heap.heap_tunables({}) is None
    thp.unlink()
    assert heap.heap_tunables({}) is None
    monkeypatch.setattr(heap, "_is_glibc", lambda: False)
    thp.write_text("[always] madvise never\n")
    assert heap.heap_tunables({}) is None


def test_armor_prune_restarts_itself_with_the_heap_tunables(tiny_model_dir, tiny_text, tmp_path):
    """The installed script's prune runs in a process started with armor.heap's settings (where they apply), and
    the run's settings record them."""
    import subprocess

    from armor.heap import heap_tunables

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_")}
    cmd = ["prune", "--model", str(tiny_model_dir), "--calib-text", str(tiny_text), "--nsamples", "4", "--seqlen",
           "32", "--no-eval", "--no-reconstruct", "--method", "magnitude", "--compare", "none", "--quiet",
           "--output", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-c", "import sys; from armor.cli import console_main; "
                           "sys.exit(console_main())", *cmd], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    marker = json.loads((tmp_path / "o" / "results.json").read_text())
    assert marker["settings"]["glibc_tunables"] == heap_tunables(env)
