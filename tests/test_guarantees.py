"""Never a wrong model reported as success (docs/guarantees.md): bad inputs and faults give a clear error naming
what is wrong, or a correct result; each case here failed (exit 0 with a wrong model, or a traceback / half
message) before it was fixed."""

from __future__ import annotations

import errno
import json
import logging
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import armor
from armor.cli import error_message
from armor.pipeline.jobs import LayerJob, run_layer_job
from armor.report import folder_footprint
from armor.stats import LayerStats
from armor.storage import read_armor_config, write_json_atomic
from armor.storage.atomic import atomic_save_safetensors, write_safetensors_streamed
from armor.storage.lock import FolderBusyError, FolderLock
from armor.text import read_documents
from conftest import TEXT, make_tiny_model, run_cli

_cli = run_cli


def _small(model_dir, text, out, *extra):
    return [
        "prune", "--model", model_dir, "--calib-text", text, "--nsamples", 4, "--seqlen", 48, "--no-eval",
        "--output", out, "--quiet", "--compare", "none", "--no-reconstruct", *extra,
    ]


# ---- clear errors instead of tracebacks or half messages ---------------------------------------------------------


def test_error_message_keeps_every_line_and_trailing_quotes():
    assert error_message(ValueError("expected 'a', got 'abc'")) == "expected 'a', got 'abc'"
    assert error_message(KeyError("tensor 'x' is missing")) == "tensor 'x' is missing"
    text = error_message(RuntimeError("Error(s) in loading state_dict for M:\n\tsize mismatch for w: [2] vs [3]."))
    assert text.splitlines() == ["Error(s) in loading state_dict for M:", "  size mismatch for w: [2] vs [3]."]
    many = error_message(ValueError("\n".join(f"line {i}" for i in range(40))))
    assert len(many.splitlines()) == 13 and "28 more lines" in many


def test_folder_with_only_a_config_says_why(capsys, tiny_model_dir, tiny_text, tmp_path):
    only = tmp_path / "only-config"
    only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", only / "config.json")
    rc, _, err = _cli(capsys, *_small(only, tiny_text, tmp_path / "o"))
    assert rc == 2 and "Traceback" not in err
    assert "cannot load a tokenizer from" in err and str(only) in err
    assert "sentencepiece" in err  # transformers' explanation is on the following lines, no longer cut off


def test_config_weights_size_mismatch_shows_the_tensors(capsys, tiny_model_dir, tmp_path):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    rc, _, err = _cli(capsys, "eval", tiny_model_dir, "--eval-seqlen", 16, "--eval-windows", 1,
                      "--eval-text", tiny_model_dir / "config.json")
    assert rc == 2 and "Traceback" not in err
    assert "config.json of" in err and "model.layers.0.mlp.gate_proj.weight: (96, 64) in the model, (128, 64)" in err


def test_refused_pickle_is_a_clear_error(capsys, tiny_model_dir, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    (tiny_model_dir / "model.safetensors").unlink()
    with open(tiny_model_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Payload()}, f)
    rc, out, err = _cli(capsys, "eval", tiny_model_dir, "--eval-seqlen", 16, "--eval-windows", 1)
    assert rc == 2 and "Traceback" not in err and "payload ran" not in out
    assert "refuses to unpickle" in err and str(tiny_model_dir) in err


def test_string_quantization_config_is_a_clear_error(capsys, tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["quantization_config"] = "armor"
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    rc, _, err = _cli(capsys, "eval", tiny_model_dir, "--eval-seqlen", 16, "--eval-windows", 1)
    assert rc == 2 and "quantization_config is a str" in err and "config.json" in err


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr("armor.storage.atomic._publish", _full_disk)
    target = tmp_path / "layers" / "x.safetensors"
    with pytest.raises(OSError, match=r"No space left on device while writing .*x\.safetensors") as info:
        atomic_save_safetensors({"a": torch.ones(2)}, target, {})
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match=r"while writing .*out\.json"):
        write_json_atomic({}, tmp_path / "out.json")
    with pytest.raises(OSError, match=r"while writing .*model\.safetensors"):
        entries = [("a", (2,), torch.float32, lambda: torch.ones(2))]
        write_safetensors_streamed(tmp_path / "model.safetensors", entries, {})
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []  # no temporary file left behind


def test_streamed_safetensors_records_the_digest_of_its_table_and_data(tmp_path):
    """The writer's SHA-256 is sha256(canonical tensor table, then the data bytes), recomputed by
    safetensors_digest from the file; safetensors itself reads the file back, metadata included."""
    import hashlib
    import json

    from safetensors import safe_open

    from armor.storage.atomic import safetensors_digest

    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([7, 8], dtype=torch.uint8)
    empty = torch.empty(0, dtype=torch.uint8)
    entries = [("a", (2, 3), torch.float32, lambda: a), ("g", (0,), torch.uint8, lambda: empty),
               ("b", (2,), torch.uint8, lambda: b)]
    digest = write_safetensors_streamed(tmp_path / "x.safetensors", entries, {"k": "v"}, digest_key="sha")
    table = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
             "b": {"dtype": "U8", "shape": [2], "data_offsets": [24, 26]},
             "g": {"dtype": "U8", "shape": [0], "data_offsets": [24, 24]}}
    brute = hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())
    brute.update(a.numpy().tobytes() + b.numpy().tobytes())
    assert digest == brute.hexdigest() == safetensors_digest(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v", "sha": digest}
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)
    renamed = [("c", *entries[0][1:]), *entries[1:]]  # same bytes under another name: another digest
    assert write_safetensors_streamed(tmp_path / "y.safetensors", renamed, {}) != digest


def test_safetensors_write_error_names_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def broken(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr("armor.storage.atomic.save_file", broken)
    with pytest.raises(OSError, match=r"while writing .*y\.safetensors") as info:
        atomic_save_safetensors({"a": torch.ones(2)}, tmp_path / "y.safetensors", {})
    assert info.value.errno == errno.ENOSPC


# ---- invalid values accepted in silence ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["-O", "sweeps=-1"], "option 'sweeps' must be an integer >= 1, got -1"),
        (["-O", "sweeps=0"], "option 'sweeps' must be an integer >= 1, got 0"),
        (["--wrapper-budget", "0.6"], "option 'wrapper_budget' 0.6 leaves nothing saved at 2:4"),
        (["--wrapper-budget", "1.2"], "option 'wrapper_budget' must be a finite number > 0 and < 1, got 1.2"),
        (["-O", "groups_per_tile=0"], "option 'groups_per_tile' must be an integer >= 1"),
        (["-O", "damping=nan"], "option 'damping' must be a finite number >= 0, got nan"),
        (["--max-seconds", "inf"], "--max-seconds must be a finite number > 0, got inf"),
        (["--seed", "99999999999999999999"], "--seed must fit in 64 bits (-2^63 to 2^64 - 1), got 9999999"),
        (["-O", "max_seconds=inf"], "option 'max_seconds' must be a finite number > 0, got inf"),
        (["--wrapper-budget", "nan"], "--wrapper-budget must be a finite number > 0, got nan"),
        (["--seqlen", "300"], "--seqlen 300 is longer than the model's max_position_embeddings (256)"),
    ],
)
def test_invalid_values_are_errors_naming_them(capsys, tiny_model_dir, tiny_text, tmp_path, extra, needle):
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", *extra))
    assert rc == 2 and needle in err
    assert not any((tmp_path / "o").rglob("*.safetensors"))


def test_block_size_that_does_not_tile_is_a_warning_naming_it(capsys, tiny_model_dir, tiny_text, tmp_path):
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", "--block-size", 7, "-O",
                                      "sweeps=1", "--nsamples", 2, "--seqlen", 16))
    assert rc == 0
    assert "block size 7 does not tile every layer" in err and "64x64 layers get 4x4" in err
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o2", "--block-size", 4, "-O",
                                      "sweeps=1", "--nsamples", 2, "--seqlen", 16))
    assert rc == 0 and "does not tile" not in err and "store more than the dense" not in err
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o3", "--block-size", 64, "-O",
                                      "sweeps=1", "--nsamples", 2, "--seqlen", 16))
    assert rc == 0 and "block size 64 makes the wrappers of" in err and "store more than the dense ones" in err


@pytest.mark.parametrize("content", [b"caf\xe9 au lait " * 40, b"text\x00\x01\x02 binary" * 40])
def test_calibration_text_that_is_not_utf8_is_refused(capsys, tiny_model_dir, tmp_path, content):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="latin1.txt"):
        read_documents(bad)
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, bad, tmp_path / "o"))
    assert rc == 2 and "latin1.txt" in err and ("is not UTF-8 text (40 invalid" in err or "NUL bytes" in err)


@pytest.mark.parametrize("value,kind", [("[\"list\", \"of\"]", "list"), ("{\"nested\": 1}", "dict"), ("3.5", "float")])
def test_jsonl_text_that_is_not_a_string_is_refused_and_nulls_are_skipped(tmp_path, value, kind):
    """Before: a null "text" became the document "None", a list or object its Python repr, calibrated on in
    silence."""
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "A real document about foxes."}\n{"text": null}\n\n{"text": "Another one."}\n')
    assert read_documents(good) == ["A real document about foxes.", "Another one."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f'{{"text": "fine"}}\n{{"text": {value}}}\n')
    with pytest.raises(ValueError, match=f"bad.jsonl:2: the 'text' field is a {kind}, not a string"):
        read_documents(bad)


def test_a_few_stray_bytes_are_a_warning_that_counts_them(tmp_path, caplog):
    text = tmp_path / "news.txt"
    text.write_bytes(b"he paid \xa33,000 for it. " + b"plain text " * 200)
    with caplog.at_level(logging.WARNING):
        assert read_documents(text)[0].startswith("he paid \ufffd3,000")
    assert "news.txt: 1 byte sequence(s) are not UTF-8 (the first at byte 8)" in caplog.text


def test_pickled_dense_checkpoint_has_its_size_counted(tmp_path, char_tokenizer):
    dense = tmp_path / "dense-bin"
    dense.mkdir()
    torch.save(make_tiny_model(len(char_tokenizer)).state_dict(), dense / "pytorch_model.bin")
    assert not list(dense.glob("*.safetensors")) and list(dense.glob("*.bin"))
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "model.safetensors").write_bytes(b"\0" * 1000)
    bin_bytes = sum(p.stat().st_size for p in dense.glob("*.bin"))
    assert folder_footprint(pruned, dense)["checkpoint_bytes_ratio"] == pytest.approx(1000 / bin_bytes)
    assert folder_footprint(pruned, tmp_path / "nothing-here")["checkpoint_bytes_ratio"] is None


def test_checkpoint_ratio_counts_only_the_files_from_pretrained_reads(tmp_path):
    # Mistral's repositories ship a consolidated.safetensors beside the shards transformers reads; a stale
    # model.safetensors next to an index is read instead of the shards (from_pretrained's order)
    dense = tmp_path / "dense"
    dense.mkdir()
    for shard, size in (("model-00001-of-00002.safetensors", 600), ("model-00002-of-00002.safetensors", 400)):
        (dense / shard).write_bytes(b"\0" * size)
    (dense / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (dense / "consolidated.safetensors").write_bytes(b"\0" * 1000)
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "model.safetensors").write_bytes(b"\0" * 500)
    (pruned / "stale-model-00001-of-00002.safetensors").write_bytes(b"\0" * 700)
    fp = folder_footprint(pruned, dense)
    assert fp["checkpoint_bytes"] == 500
    assert fp["checkpoint_bytes_ratio"] == pytest.approx(500 / 1000)


# ---- non-finite numbers are never saved as success -------------------------------------------------------------


def _ids(tokenizer, nsamples=4, seqlen=48):
    return armor.calibration_ids(tokenizer, [TEXT * 12], nsamples, seqlen)


def test_huge_weight_never_stores_a_non_finite_layer(char_tokenizer, tmp_path):
    """Before: armor-fast exited 0 with finite losses while a layer's b_blocks held NaN (NaN logits on load)."""
    model = make_tiny_model(len(char_tokenizer))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = 1e38
    run = armor.prune(model, _ids(char_tokenizer), "armor-fast", options={"sweeps": 2}, output=tmp_path / "o")
    loaded = armor.load(tmp_path / "o")
    for name, mod in [*armor.storage.pruned_modules(model).items(), *armor.storage.pruned_modules(loaded).items()]:
        assert all(torch.isfinite(v).all() for v in mod.state_dict().values() if v.is_floating_point()), name
    rec = next(r for r in run.records if r.name == "model.layers.0.self_attn.q_proj")
    assert rec.extra["non_finite_fallback"] == {"method": "armor-fast", "tensors": ["b_blocks"], "kept": "nowag"}
    assert rec.loss == rec.nowag_loss and rec.extra["block_size_out"] is None and rec.extra["params"]["wrappers"] == 0
    saved = read_armor_config(tmp_path / "o")["records"]
    assert next(r for r in saved if r["name"] == rec.name)["non_finite_fallback"]["kept"] == "nowag"
    with torch.no_grad():
        assert torch.isfinite(loaded(_ids(char_tokenizer)[:1]).logits).all()


@pytest.mark.parametrize("method", ["sparsegpt", "armor-fast", "wanda"])
def test_non_finite_weight_error_names_the_layer(char_tokenizer, method):
    """A run refuses the model as it reads the tensor; a layer job handed such a weight names its layer."""
    model = make_tiny_model(len(char_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN"):
        armor.prune(model, _ids(char_tokenizer), method, options={"sweeps": 1} if method == "armor-fast" else None)
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, generator=gen), torch.randn(64, 16, generator=gen)
    w[0, 0] = float("nan")
    job = LayerJob(name="blk.1.up", weight=w, bias=None, stats=LayerStats(x.pow(2).mean(0) * 2, 2 * x.T @ x / 64),
                   method=method, options=armor.METHODS[method].resolve(), fingerprint="x")
    with pytest.raises(ValueError, match=rf"layer blk\.1\.up \({method}\).*non-finite"):
        run_layer_job(job)


def test_sparsegpt_cholesky_failure_names_the_layer(monkeypatch):
    def singular(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    monkeypatch.setattr(torch.linalg, "cholesky", singular)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=gen)
    x = torch.randn(64, 16, generator=gen)
    job = LayerJob(name="blk.3.fc", weight=w, bias=None, stats=LayerStats(x.pow(2).mean(0) * 2, 2 * x.T @ x / 64),
                   method="sparsegpt", options=armor.METHODS["sparsegpt"].resolve(), fingerprint="x")
    with pytest.raises(RuntimeError, match=r"layer blk\.3\.fc \(sparsegpt\): .*cholesky"):
        run_layer_job(job)


def test_statistics_repaired_beyond_a_few_entries_is_a_warning(caplog):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    h = torch.rand(64, generator=gen) + 0.5
    job = LayerJob(name="blk.1.fc", weight=w, bias=None, stats=LayerStats(h), method="nowag", options={},
                   fingerprint="x")
    with caplog.at_level(logging.WARNING):
        run_layer_job(job)
    assert "blk.1.fc" not in caplog.text
    h[:20] = float("nan")
    job.stats = LayerStats(h)
    with caplog.at_level(logging.WARNING):
        out = run_layer_job(job)
    assert "layer blk.1.fc: 20 of 64 Hessian-diagonal entries" in caplog.text
    assert out.record["repaired_stats"] == 20


def test_eval_of_a_nan_model_says_non_finite_logits(capsys, tiny_model_dir, tiny_text, char_tokenizer):
    model = make_tiny_model(len(char_tokenizer))
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(tiny_model_dir)
    rc, _, err = _cli(capsys, "eval", tiny_model_dir, "--eval-text", tiny_text, "--eval-seqlen", 32,
                      "--eval-windows", 2)
    assert rc == 2 and "non-finite logits" in err and "architecture" not in err


# ---- one writer per output folder; overwriting says what it replaces -------------------------------------------


def test_second_run_into_a_locked_folder_is_refused_and_a_killed_holder_frees_it(capsys, tiny_model_dir, tiny_text,
                                                                                  tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from armor.storage.lock import FolderLock; "
         f"FolderLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "nowag"))
        assert rc == 2 and f"another armor run (process {holder.pid}) is writing into {out}" in err
        assert not (out / "nowag").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".armor-lock").is_file()  # left by the killed holder: harmless
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "nowag"))
    assert rc == 0, err  # the lock died with its process: nothing stuck
    assert not list(out.rglob(".armor-lock"))  # a run that ends leaves no lock file, here or in nowag/
    with FolderLock(out), pytest.raises(FolderBusyError, match=str(out)):
        FolderLock(out).acquire()


def test_overwrite_never_replaces_files_armor_did_not_write(capsys, tiny_model_dir, tiny_text, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    (mine / "results.json").write_text("{}")
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, mine, "--method", "nowag", "--overwrite"))
    assert rc == 2 and "would replace report.md, results.json, which it did not write" in err
    assert (mine / "report.md").read_text() == "my own report"
    (mine / "report.md").unlink()
    (mine / "results.json").unlink()
    (mine / "nowag").mkdir()
    (mine / "nowag" / "notes.txt").write_text("mine")
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, mine, "--method", "nowag", "--overwrite"))
    assert rc == 2 and "would replace nowag/" in err and (mine / "nowag" / "notes.txt").read_text() == "mine"
    (mine / "nowag" / "notes.txt").unlink()
    (mine / "thesis.tex").write_text("kept")
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, mine, "--method", "nowag", "--overwrite"))
    assert rc == 0, err  # beside other files, never over them
    assert (mine / "thesis.tex").read_text() == "kept" and (mine / "report.md").is_file()


def test_rerun_with_other_options_says_what_it_replaces(capsys, tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "o"
    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "sparsegpt"))
    assert rc == 0, err
    assert "replaced" not in stdout
    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "sparsegpt", "-O", "damp=0.1"))
    assert rc == 0, err
    assert f"replaced the sparsegpt model that was in {out / 'sparsegpt'}" in stdout and '"damp": 0.01' in stdout
    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "sparsegpt", "-O", "damp=0.1"))
    assert rc == 0 and "already pruned" in stdout and "replaced" not in stdout


# ---- armor inspect checks what it describes --------------------------------------------------------------------


@pytest.fixture()
def pruned_dir(char_tokenizer, tmp_path):
    model = make_tiny_model(len(char_tokenizer))
    armor.prune(model, _ids(char_tokenizer), "nowag", output=tmp_path / "pruned", tokenizer=char_tokenizer)
    return tmp_path / "pruned"


def test_inspect_refuses_a_config_without_its_layer_list(capsys, pruned_dir):
    rc, out, _ = _cli(capsys, "inspect", pruned_dir)
    assert rc == 0 and "pruned layers: 14" in out
    cfg = json.loads((pruned_dir / "config.json").read_text())
    del cfg["quantization_config"]["layers"]
    (pruned_dir / "config.json").write_text(json.dumps(cfg))
    rc, out, err = _cli(capsys, "inspect", pruned_dir)
    assert rc == 2 and "lists no pruned layers" in err and "pruned layers: 0" not in out


@pytest.mark.parametrize("key", ["model.layers.0.mlp.down_proj.indices", "model.norm.weight"])
def test_inspect_refuses_a_folder_missing_a_tensor(capsys, pruned_dir, key):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = pruned_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    del state[key]
    save_file(state, str(weights), metadata=meta)
    rc, _, err = _cli(capsys, "inspect", pruned_dir)
    assert rc == 2 and key in err


@pytest.mark.parametrize("key,damage,needle", [
    ("model.layers.0.self_attn.q_proj.indices", "repeat", "q_proj.indices is damaged: row 2, columns 0..3"),
    ("model.layers.1.mlp.up_proj.values", "nan", "up_proj.values holds 1 NaN or infinite values"),
    ("model.norm.weight", "inf", "model.norm.weight holds 1 NaN or infinite values"),
])
def test_inspect_check_data_reads_positions_and_values(capsys, pruned_dir, key, damage, needle):
    """The headers say nothing of the data: plain inspect describes a folder with a damaged index byte or a NaN
    value; --check-data reads every tensor and refuses it, naming the file and tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    rc, out, err = _cli(capsys, "inspect", pruned_dir, "--check-data")
    assert rc == 0 and "data check:" in out and "packed positions valid, values finite" in out, err
    weights = pruned_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    if damage == "repeat":
        state[key][2, 0] = 0  # the first group of row 2 stores positions 0, 0
    else:
        state[key].view(-1)[5] = float("nan" if damage == "nan" else "inf")
    save_file(state, str(weights), metadata=meta)
    rc, out, _ = _cli(capsys, "inspect", pruned_dir)
    assert rc == 0 and "data check:" not in out  # the headers alone cannot see it
    rc, out, err = _cli(capsys, "inspect", pruned_dir, "--check-data")
    assert rc == 2 and needle in err and str(weights) in err and "pruned layers" not in out


# ---- resume and "already pruned" trust only files of this very model -------------------------------------------


def _model_b(char_tokenizer):
    """Model A's projection weights with other embeddings and norms."""
    model = make_tiny_model(len(char_tokenizer))
    other = make_tiny_model(len(char_tokenizer), seed=7)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(other.model.embed_tokens.weight)
        model.model.norm.weight.mul_(1.5)
        model.model.layers[1].input_layernorm.weight.mul_(0.5)
    return model


def test_finished_folder_of_another_model_is_not_taken_for_this_one(capsys, char_tokenizer, tiny_text, tmp_path):
    dirs = {}
    for label, model in (("a", make_tiny_model(len(char_tokenizer))), ("b", _model_b(char_tokenizer))):
        dirs[label] = tmp_path / label
        model.save_pretrained(dirs[label])
        char_tokenizer.save_pretrained(dirs[label])
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, *_small(dirs["a"], tiny_text, out, "--method", "wanda"))
    assert rc == 0, err
    rc, stdout, err = _cli(capsys, *_small(dirs["b"], tiny_text, out, "--method", "wanda"))
    assert rc == 0, err
    assert "already pruned" not in stdout and "replaced the wanda model" in stdout
    saved = armor.load(out / "wanda")
    b = armor.storage.load_model(dirs["b"])
    assert torch.equal(saved.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert torch.equal(saved.model.norm.weight, b.model.norm.weight)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_changed_config_is_another_model_for_resume_and_reuse(capsys, tiny_model_dir, tiny_text, tmp_path,
                                                                 streaming):
    """Before: after config.json's activation and norm epsilon changed, a rerun said "already pruned" and kept the
    old model, and a killed run resumed layers fitted to the old forward's statistics (the digests covered the
    tensors only)."""
    import shutil

    from safetensors.torch import load_file

    extra = ["--method", "wanda", "--keep-layers", *(["--streaming"] if streaming else [])]
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, *extra))
    assert rc == 0, err
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu", "rms_norm_eps": 0.5}))
    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, *extra))
    assert rc == 0 and "already pruned" not in stdout and "replaced the wanda model" in stdout, (stdout, err)
    assert json.loads((out / "wanda" / "config.json").read_text())["hidden_act"] == "relu"
    fresh = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "fresh", *extra))
    assert fresh[0] == 0
    state, want = (load_file(d / "wanda" / "model.safetensors") for d in (out, tmp_path / "fresh"))
    assert state.keys() == want.keys() and all(torch.equal(t, want[k]) for k, t in state.items())
    # a killed run's layer files (fitted under the changed config) are resumed under it, never under the first
    for f in out.joinpath("wanda").iterdir():
        if f.name in ("config.json", "model.safetensors", "records.jsonl", "generation_config.json") or \
                f.name.startswith("tokenizer"):
            f.unlink()
    shutil.copytree(out, tmp_path / "killed")
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, *extra))
    assert rc == 0 and "resumed" not in stdout, (stdout, err)
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu", "rms_norm_eps": 0.5}))
    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "killed", *extra))
    assert rc == 0 and "resumed 14 finished layers" in stdout, (stdout, err)


class _Killed(Exception):
    pass


def test_resume_never_reuses_layers_fitted_to_another_model(char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    out = tmp_path / "run"
    seen: list[str] = []

    def die_after_four(name, rec):
        seen.append(name)
        if len(seen) == 4:
            raise _Killed

    with pytest.raises(_Killed):
        armor.prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", output=out, callback=die_after_four)
    assert len(list((out / "layers").glob("*.safetensors"))) == 4
    run = armor.prune(_model_b(char_tokenizer), ids, "wanda", output=out, keep_layer_files=True)
    ref = armor.prune(_model_b(char_tokenizer), ids, "wanda", output=tmp_path / "ref", keep_layer_files=True)
    assert run.resumed == 0
    for a, b in zip(run.records, ref.records, strict=True):
        assert (a.name, a.loss, a.nowag_loss) == (b.name, b.loss, b.nowag_loss)


def test_activations_a_killed_run_spilled_are_removed_by_the_next_run(char_tokenizer, tmp_path):
    out = tmp_path / "run"
    stale = out / ".activations" / "armor-act-4242-1"  # what a SIGKILLed run leaves (its finally never ran)
    stale.mkdir(parents=True)
    (stale / "act-0.safetensors").write_bytes(b"\0" * 64)
    armor.prune(make_tiny_model(len(char_tokenizer)), _ids(char_tokenizer), "wanda", output=out,
                activation_budget=1)
    assert not (out / ".activations").exists()
    assert (out / "config.json").is_file()


def test_resume_after_a_change_in_a_later_block_keeps_the_earlier_layers(char_tokenizer, tmp_path):
    """The chain covers the blocks up to a layer's own: a change in block 1 leaves block 0's layers reusable."""
    ids = _ids(char_tokenizer)
    armor.prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", output=tmp_path / "run", keep_layer_files=True)
    (tmp_path / "run" / "config.json").unlink()
    changed = make_tiny_model(len(char_tokenizer))
    with torch.no_grad():
        changed.model.layers[1].post_attention_layernorm.weight.mul_(2.0)
    run = armor.prune(changed, ids, "wanda", output=tmp_path / "run", keep_layer_files=True)
    assert sorted(r.name for r in run.records if r.resumed) == sorted(
        r.name for r in run.records if r.name.startswith("model.layers.0."))


def test_layer_file_whose_content_changed_is_redone(char_tokenizer, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    ids = _ids(char_tokenizer)
    ref = armor.prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", output=tmp_path / "run",
                      keep_layer_files=True)
    (tmp_path / "run" / "config.json").unlink()
    name = "model.layers.1.mlp.up_proj"
    path = tmp_path / "run" / "layers" / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["values"] = state["values"] * 1.01  # valid file, same header, other numbers
    save_file(state, str(path), metadata=meta)
    with caplog.at_level(logging.WARNING):
        run = armor.prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", output=tmp_path / "run",
                          keep_layer_files=True)
    assert [r.name for r in run.records if not r.resumed] == [name]
    assert f"layer {name}: the tensors in" in caplog.text
    fresh = load_file(str(path))
    assert torch.equal(fresh["values"], armor.storage.load_pruned(tmp_path / "run").get_submodule(name).values)
    assert [r.loss for r in run.records] == [r.loss for r in ref.records]


def test_already_finished_run_prunes_the_callers_model_in_place(char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    first = make_tiny_model(len(char_tokenizer))
    armor.prune(first, ids, "nowag", output=tmp_path / "run")
    model = make_tiny_model(len(char_tokenizer))
    run = armor.prune(model, ids, "nowag", output=tmp_path / "run")
    assert run.already_done and run.model is model
    assert len(armor.storage.pruned_modules(model)) == 14
    with torch.no_grad():
        assert torch.equal(model(ids[:1]).logits, first(ids[:1]).logits)


def test_library_run_into_a_folder_another_run_writes_is_refused(char_tokenizer, tmp_path):
    with FolderLock(tmp_path / "run"), pytest.raises(FolderBusyError, match="another armor run"):
        armor.prune(make_tiny_model(len(char_tokenizer)), _ids(char_tokenizer), "nowag", output=tmp_path / "run")
    run = armor.prune(make_tiny_model(len(char_tokenizer)), _ids(char_tokenizer), "nowag", output=tmp_path / "run")
    assert len(run.records) == 14 and (tmp_path / "run" / "config.json").is_file()
    assert not (tmp_path / "run" / ".armor-lock").exists()


def test_fresh_streamed_run_reads_each_weight_once(char_tokenizer, tmp_path, monkeypatch):
    """The fingerprints of a fresh run come from the tensors the walk loads anyway: before the save, no tensor
    of the checkpoint is read twice (the old plan read every pruned weight once more up front)."""
    from armor.storage.checkpoint import ShardReader

    model_dir = tmp_path / "model"
    make_tiny_model(len(char_tokenizer), tie=False).save_pretrained(model_dir)
    reads: list[str] = []
    original = ShardReader.load

    def counting(self, keys, *args, **kwargs):
        keys = list(keys)
        reads.extend(keys)
        return original(self, keys, *args, **kwargs)

    monkeypatch.setattr(ShardReader, "load", counting)
    monkeypatch.setattr("armor.pipeline.sources.CheckpointSource.save", lambda *a, **k: None)
    run = armor.prune(model_dir, _ids(char_tokenizer), "wanda", output=tmp_path / "run", keep_layer_files=True)
    assert sorted(set(reads)) == sorted(reads)  # each tensor once
    assert "lm_head.weight" in reads and all(f"{r.name}.weight" in reads for r in run.records)
    # and the same fingerprints as the plan computes up front when there is something to resume
    monkeypatch.setattr(ShardReader, "load", original)
    again = armor.prune(model_dir, _ids(char_tokenizer), "wanda", output=tmp_path / "run")
    assert again.resumed == 14
