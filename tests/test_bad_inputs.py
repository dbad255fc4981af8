"""Bad inputs found by probing (docs/guarantees.md): each gave a traceback, an error naming the wrong thing, or a
wrong model in silence before it was fixed; now each is a clear error naming the input, or a correct result."""

from __future__ import annotations

import re

import pytest
import torch

import armor
from armor.storage import CheckpointError
from conftest import TEXT, make_tiny_model, run_cli

_cli = run_cli


def _small(model_dir, text, out, *extra):
    return [
        "prune", "--model", model_dir, "--calib-text", text, "--nsamples", 4, "--seqlen", 48, "--no-eval",
        "--output", out, "--quiet", "--compare", "none", "--no-reconstruct", "-O", "sweeps=1", *extra,
    ]


def test_tokenizer_with_more_tokens_than_the_model_is_an_error_naming_the_text(capsys, char_tokenizer, tiny_text,
                                                                               tmp_path):
    """Before: IndexError 'index out of range in self' from the embedding lookup, as a traceback (exit 1)."""
    folder = tmp_path / "small-vocab"
    make_tiny_model(50).save_pretrained(folder)  # the char tokenizer has 98 tokens
    char_tokenizer.save_pretrained(folder)
    rc, _, err = _cli(capsys, *_small(folder, tiny_text, tmp_path / "o"))
    assert rc == 2 and "Traceback" not in err
    assert "calibration text" in err and "outside the model's vocabulary of 50 embeddings" in err
    assert not (tmp_path / "o").exists()
    rc, _, err = _cli(capsys, "eval", folder, "--eval-text", tiny_text, "--eval-seqlen", 16, "--eval-windows", 1)
    assert rc == 2 and "text.txt holds token id" in err and "vocabulary of 50" in err
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    ids[0, 0] = -1
    with pytest.raises(ValueError, match="calibration holds token id -1, outside"):
        armor.prune(make_tiny_model(len(char_tokenizer)), ids, "magnitude")


def test_config_that_ties_a_head_stored_apart_loads_as_transformers_loads_it(char_tokenizer, tmp_path, caplog):
    """A config saying tie_word_embeddings while the weights hold a distinct lm_head.weight: transformers loads the
    two apart. Before: armor.load tied the head to the embeddings (a different model, in silence), and a streamed
    run evaluated and saved the tied model."""
    import json

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tie-flag"
    make_tiny_model(len(char_tokenizer), tie=False).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    dense = AutoModelForCausalLM.from_pretrained(folder)
    assert dense.lm_head.weight is not dense.model.embed_tokens.weight  # transformers keeps them apart
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    run = armor.prune(dense, ids, "magnitude", output=tmp_path / "memory")
    streamed = armor.prune(folder, ids, "magnitude", output=tmp_path / "streamed")
    assert streamed.mean_losses() == run.mean_losses()
    x = ids[:1, :32]
    want = run.model(x).logits
    caplog.clear()  # (the streamed run warned about the dense folder it read)
    for out in ("memory", "streamed"):  # both folders say what they store: no warning at each load
        assert json.loads((tmp_path / out / "config.json").read_text())["tie_word_embeddings"] is False, out
        with caplog.at_level("WARNING"):
            loaded = armor.load(tmp_path / out)
        assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
        assert (loaded(x).logits - want).abs().max() < 1e-5, out
    assert "but the weights hold both" not in caplog.text
    with caplog.at_level("WARNING"):  # the dense folder itself still disagrees with its config: said when read
        armor.prune(folder, ids, "magnitude", output=tmp_path / "streamed-again")
    assert "ties model.embed_tokens.weight to lm_head.weight, but the weights hold both" in caplog.text


def test_pattern_and_dtype_the_packed_layers_cannot_take_fail_before_anything_is_written(capsys, char_tokenizer,
                                                                                       tiny_model_dir, tiny_text,
                                                                                       tmp_path):
    """Before: --m 128 (or m=32 in Python) ran calibration and pruned a layer, then failed in the packing with a
    message naming no input, leaving the output folder with a run marker and records.jsonl; a dtype given as a
    string failed with "Invalid device string: 'float16'"."""
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", "--n", 1, "--m", 128))
    assert rc == 2 and "--m must be at most 16" in err and "got 128" in err
    assert not (tmp_path / "o").exists()
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    with pytest.raises(ValueError, match="group size m must be in 2..16 for packed storage, got 32"):
        armor.prune(tiny_model_dir, ids, "magnitude", n=2, m=32, output=tmp_path / "lib")
    with pytest.raises(ValueError, match="n:m pattern needs integers 0 < n < m, got n=3, m=2"):
        armor.prune(tiny_model_dir, ids, "magnitude", n=3, m=2, output=tmp_path / "lib")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype .* got 'float16'"):
        armor.prune(tiny_model_dir, ids, "magnitude", dtype="float16", output=tmp_path / "lib")
    assert not (tmp_path / "lib").exists()


def test_a_pruned_folder_given_as_the_model_to_prune_is_refused_naming_it(capsys, char_tokenizer, tiny_model_dir,
                                                                         tiny_text, tmp_path):
    """Before: the CLI wrote a run marker, then failed with "could not find the decoder blocks" (in memory) or
    "cannot store model.embed_tokens.weight of dtype None" (--streaming, a partly pruned folder)."""
    rc, _, _ = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "first", "--layers", "q_proj"))
    pruned = tmp_path / "first" / "armor-fast"
    assert rc == 0
    for extra in ((), ("--streaming",)):
        rc, _, err = _cli(capsys, *_small(pruned, tiny_text, tmp_path / "again", *extra))
        assert rc == 2 and f"--model {pruned} is already an armor-pruned model" in err
        assert f"made from {tiny_model_dir}" in err and not (tmp_path / "again").exists()
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    with pytest.raises(ValueError, match="already an armor-pruned model"):
        armor.prune(pruned, ids, "magnitude", output=tmp_path / "lib")
    run = armor.prune(make_tiny_model(len(char_tokenizer)), ids, "magnitude")
    with pytest.raises(ValueError, match="the model is already pruned: its decoder blocks hold no nn.Linear"):
        armor.prune(run.model, ids, "magnitude")


def test_eval_seqlen_beyond_the_models_positions_is_an_error_in_armor_eval(capsys, tiny_model_dir, tiny_text):
    """docs/guarantees.md promised it for --eval-seqlen; armor prune checked it, armor eval exited 0 with a
    perplexity over positions the model was never trained for."""
    rc, out, err = _cli(capsys, "eval", tiny_model_dir, "--eval-text", tiny_text, "--eval-seqlen", 300)
    assert rc == 2 and "--eval-seqlen 300 is longer than the model's max_position_embeddings (256)" in err
    assert "perplexity on" not in out
    rc, out, _ = _cli(capsys, "eval", tiny_model_dir, "--eval-text", tiny_text, "--eval-seqlen", 256)
    assert rc == 0 and "perplexity on" in out


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"vocab_size": 90}, "model.embed_tokens.weight is (98, 64) in the weights, (90, 64) in the model"),
        ({"layer_type": "sparse"}, "holds tensors the model does not have: model.layers.0.self_attn.q_proj.a_blocks"),
        ({"drop_layer": True}, "model.layers.0.self_attn.q_proj is stored packed (its weight is a guard), but "
                               "quantization_config.layers does not list it"),
    ],
)
def test_inspect_refuses_a_folder_whose_other_tensors_do_not_match(capsys, tiny_model_dir, tiny_text, tmp_path,
                                                                   edit, needle):
    """Before: armor inspect described (exit 0) folders that armor eval and armor.load refuse: an embedding stored
    in another shape than config.json gives, or an ARMOR layer's wrappers under a layer the config calls sparse."""
    import json

    rc, _, _ = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", "--block-size", 4))
    folder = tmp_path / "o" / "armor-fast"
    cfg = json.loads((folder / "config.json").read_text())
    if "layer_type" in edit:
        cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["type"] = edit["layer_type"]
    elif "drop_layer" in edit:
        del cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]
    else:
        cfg.update(edit)
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, _, err = _cli(capsys, "inspect", folder)
    assert rc == 2 and needle in err
    rc, _, err = _cli(capsys, "eval", folder, "--eval-text", tiny_text, "--eval-seqlen", 16, "--eval-windows", 1)
    assert rc == 2 and needle in err and str(folder) in err  # what inspect says, the loader says, naming the folder
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        armor.load(folder)


def test_a_repeated_position_in_the_packed_indices_is_refused_by_both_loaders(capsys, tiny_model_dir, tiny_text,
                                                                              tmp_path):
    """Before: one damaged index byte (both kept values of a group at position 0) loaded silently; the packed
    kernel then added both values into one column where the dense path kept one, so a model's logits depended on
    how many tokens a call carried, and its export was a third model."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    rc, _, _ = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o"))
    folder = tmp_path / "o" / "armor-fast"
    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(weights)
    key = "model.layers.1.mlp.down_proj.indices"
    assert int(state[key][3, 2]) != 0
    state[key][3, 2] = 0  # positions 0, 0 for the fifth and sixth groups of row 3
    save_file(state, weights, metadata=meta)
    needle = "model.layers.1.mlp.down_proj.indices is damaged: row 3, columns 16..19: stored positions [0, 0]"
    with pytest.raises(ValueError, match=re.escape(needle)):
        armor.load(folder)
    with pytest.raises(ValueError, match=re.escape(needle)):
        AutoModelForCausalLM.from_pretrained(folder)
    rc, _, err = _cli(capsys, "export", folder, tmp_path / "dense")
    assert rc == 2 and needle in err and not (tmp_path / "dense").exists()


def test_library_settings_of_the_wrong_shape_are_errors_naming_them(char_tokenizer):
    """Before: ``include="q_proj"`` was split into one-letter patterns, ``options="sweeps=3"`` failed inside the
    option table naming letters, and calibration longer than the model's positions ran (the CLI checked it)."""
    model = make_tiny_model(len(char_tokenizer))
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    with pytest.raises(TypeError, match=r"include must be a list of layer name patterns, got 'q_proj' \(for one"):
        armor.prune(model, ids, include="q_proj")
    with pytest.raises(TypeError, match="exclude must be a list of layer name patterns, got \\[1\\]"):
        armor.prune(model, ids, exclude=[1])
    with pytest.raises(TypeError, match="options must be a mapping of option names to values, got 'sweeps=3'"):
        armor.prune(model, ids, options="sweeps=3")
    long = armor.calibration_ids(char_tokenizer, [TEXT * 40], 1, 300)
    with pytest.raises(ValueError, match="300 tokens are longer than the model's max_position_embeddings \\(256\\)"):
        armor.prune(model, long, "magnitude")
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("q_proj"))


def test_export_onto_its_own_source_is_refused(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: ``armor export P P --overwrite`` replaced the pruned folder with its dense export."""
    rc, _, _ = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "run"))
    pruned = tmp_path / "run" / "armor-fast"
    before = sorted(p.name for p in pruned.iterdir())
    rc, _, err = _cli(capsys, "export", pruned, pruned / ".." / "armor-fast", "--overwrite")
    assert rc == 2 and "is the pruned model being exported" in err
    assert sorted(p.name for p in pruned.iterdir()) == before and armor.load(pruned) is not None


def test_library_run_into_a_folder_holding_a_dense_model_is_refused(char_tokenizer, tiny_model_dir, tmp_path):
    """Before: ``armor.prune(folder, output=folder)`` deleted the dense folder's config.json, wrote layers/ into it
    and failed ('Unrecognized model'), leaving the dense model unloadable; with a model in memory, ``output=`` a
    dense model's folder replaced its config.json and weights by the pruned model's, in silence."""
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    with pytest.raises(ValueError, match="is the model being pruned"):
        armor.prune(tiny_model_dir, ids, "magnitude", output=tiny_model_dir)
    with pytest.raises(ValueError, match="holds a model that is not armor-pruned"):
        armor.prune(make_tiny_model(len(char_tokenizer), seed=1), ids, "magnitude", output=tiny_model_dir)
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before
    out = tmp_path / "pruned"  # a folder armor wrote is still taken over (resumed, or replaced by the new run)
    armor.prune(tiny_model_dir, ids, "magnitude", output=out)
    armor.prune(tiny_model_dir, ids, "wanda", output=out)
    assert armor.load(out).armor_config["method"] == "wanda"


def test_a_dtype_no_model_runs_in_is_an_error_naming_it(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: ``armor.load(folder, dtype=torch.int8)`` raised load_state_dict's RuntimeError about
    ``model.embed_tokens.weight``; ``dtype="float8_e4m3fn"`` (and ``armor eval --dtype float8_e4m3fn``) passed the
    check and failed later ('"equal_notnan_cpu" not implemented for Float8_e4m3fn')."""
    from armor.storage import load_model

    rc, _, _ = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "run"))
    pruned = tmp_path / "run" / "armor-fast"
    for dtype in (torch.int8, torch.float8_e4m3fn, "float8_e4m3fn", "int8"):
        for load in (armor.load, load_model):
            with pytest.raises(ValueError, match="unknown dtype .*; use float32, float16 or bfloat16"):
                load(pruned, dtype=dtype)
        with pytest.raises(ValueError, match="unknown dtype"):
            load_model(tiny_model_dir, dtype=dtype)
    rc, _, err = _cli(capsys, "eval", pruned, "--eval-text", tiny_text, "--eval-seqlen", 16, "--eval-windows", 1,
                      "--dtype", "float8_e4m3fn")
    assert rc == 2 and "unknown dtype 'float8_e4m3fn'" in err
    assert armor.load(pruned, dtype=torch.float64).dtype == torch.float64  # float64 still runs (dense paths)


def test_unknown_task_names_are_refused_before_the_perplexity_runs(capsys, tiny_model_dir, tiny_text):
    """Before: ``armor eval --tasks bogus`` computed the whole perplexity, then failed on the task name; ``--tasks ,``
    ran no task and said nothing."""
    pytest.importorskip("lm_eval")
    rc, out, err = _cli(capsys, "eval", tiny_model_dir, "--eval-text", tiny_text, "--eval-seqlen", 32,
                        "--tasks", "britannica_completion,no_such_task_xyz")
    assert rc == 2 and "--tasks: no task named no_such_task_xyz" in err and "perplexity on" not in out
    rc, out, err = _cli(capsys, "eval", tiny_model_dir, "--eval-text", tiny_text, "--tasks", ",")
    assert rc == 2 and "names no task" in err and "perplexity on" not in out


def test_a_finished_run_removes_only_its_own_layer_files(char_tokenizer, tmp_path, caplog):
    """Before: a run without keep_layer_files removed ``<output>/layers`` whole, a user's own files in it too."""
    out = tmp_path / "run"
    (out / "layers").mkdir(parents=True)
    (out / "layers" / "notes.txt").write_text("mine")
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    with caplog.at_level("WARNING"):
        armor.prune(make_tiny_model(len(char_tokenizer)), ids, "magnitude", output=out)
    assert sorted(p.name for p in (out / "layers").iterdir()) == ["notes.txt"]
    assert "holds files armor did not write: notes.txt" in caplog.text
    armor.prune(make_tiny_model(len(char_tokenizer)), ids, "magnitude", output=tmp_path / "clean")
    assert not (tmp_path / "clean" / "layers").exists() and (tmp_path / "clean" / "config.json").is_file()


def test_a_holdout_that_leaves_no_whole_batch_to_train_on_is_refused_up_front(capsys, tiny_model_dir, tiny_text,
                                                                              tmp_path):
    """Before: only --reconstruct-holdout < --nsamples was checked; 10 sequences in batches of 4 with a holdout of
    8 ran the dense evaluation and pruned block 0, then failed ("leaves no calibration batch to train on")."""
    argv = [a for a in _small(tiny_model_dir, tiny_text, tmp_path / "o") if a != "--no-reconstruct"]
    argv[argv.index("--nsamples") + 1] = 10
    rc, _, err = _cli(capsys, *argv, "--batch-size", 4, "--reconstruct-holdout", 8)
    assert rc == 2 and "--reconstruct-holdout 8 leaves none of the --nsamples 10" in err
    assert "whole batches of --batch-size 4 (3 batches)" in err
    assert not (tmp_path / "o").exists()  # nothing pruned, nothing written


def test_a_sequential_resume_redoes_layers_whose_earlier_blocks_were_pruned_otherwise(char_tokenizer, tmp_path):
    """Sequential statistics come from the model pruned so far.  Before: a rerun without --exclude reused block 1's
    layers, fitted while block 0's MLP stayed dense, and exited 0 with a model unlike a fresh run's."""
    from armor.storage import pruned_modules

    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 32)
    kw = dict(mode="sequential", reconstruct=None, batch_size=2)
    vocab = len(char_tokenizer)
    armor.prune(make_tiny_model(vocab), ids, "wanda", output=tmp_path / "a", exclude=["model.layers.0.mlp.*"],
                keep_layer_files=True, **kw)
    rerun = armor.prune(make_tiny_model(vocab), ids, "wanda", output=tmp_path / "a", **kw)
    fresh = armor.prune(make_tiny_model(vocab), ids, "wanda", output=tmp_path / "b", **kw)
    assert rerun.resumed == 4  # block 0's attention: pruned from the dense model's statistics either way
    got, want = pruned_modules(rerun.model), pruned_modules(fresh.model)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].dense_weight(), want[name].dense_weight()), name


def test_a_streamed_run_reads_the_weights_transformers_reads(char_tokenizer, tmp_path):
    """Before: a folder holding model.safetensors (model B) and a sharded index (model A) was pruned as A when
    streamed and as B in memory (as transformers loads it), exit 0 both ways; a shard the index lists but the
    folder lacks failed only after the output folder had a run marker."""
    import shutil

    from armor.storage import pruned_modules
    from armor.storage.checkpoint import CheckpointError

    vocab = len(char_tokenizer)
    folder = tmp_path / "both"
    make_tiny_model(vocab, seed=0).save_pretrained(folder, max_shard_size="40KB")  # model A, sharded
    make_tiny_model(vocab, seed=1).save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "model.safetensors", folder)  # model B, what from_pretrained reads
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 32)
    streamed = armor.prune(folder, ids, "magnitude", output=tmp_path / "s", reconstruct=None)
    in_memory = armor.prune(make_tiny_model(vocab, seed=1), ids, "magnitude", reconstruct=None)
    assert streamed.run_info["mean_loss"] == in_memory.run_info["mean_loss"]
    loaded, want = pruned_modules(armor.load(tmp_path / "s")), pruned_modules(in_memory.model)
    for name in want:
        assert torch.equal(loaded[name].dense_weight(), want[name].dense_weight()), name
    (folder / "model.safetensors").unlink()
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"weights file.s. not found in .*: {shard.name}, which"):
        armor.prune(folder, ids, "magnitude", output=tmp_path / "m", reconstruct=None)
    assert not (tmp_path / "m").exists()


def test_an_unwritable_json_path_is_refused_before_the_work(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: armor eval / armor bench ran the whole evaluation or benchmark, then failed with '[Errno 2] No such
    file or directory' (or 'Is a directory'), naming no option."""
    for where, needle in ((tmp_path / "no" / "x.json", "the folder"), (tmp_path, "is a folder")):
        rc, out, err = _cli(capsys, "eval", tiny_model_dir, "--eval-text", tiny_text, "--eval-seqlen", 16,
                            "--eval-windows", 1, "--json", where)
        assert rc == 2 and f"--json {where}" in err and needle in err and "perplexity" not in out.lower()
        rc, out, err = _cli(capsys, "bench", "--storage-only", "--json", where)
        assert rc == 2 and f"--json {where}" in err and needle in err and "armor runtime bench" not in out


def test_inspect_of_a_run_folder_names_the_model_folders_in_it(capsys, tmp_path):
    """Before: 'not a model folder (no config.json)' and nothing more for armor prune's output folder."""
    (tmp_path / "run" / "armor-fast").mkdir(parents=True)
    (tmp_path / "run" / "armor-fast" / "config.json").write_text("{}")
    for command in (["inspect"], ["eval"], ["bench", "--models"]):
        rc, _, err = _cli(capsys, *command, tmp_path / "run")
        assert rc == 2 and f"it holds the model folder(s) {tmp_path / 'run'}/armor-fast" in err, command


def test_a_pickled_checkpoint_beside_another_safetensors_file_loads_as_transformers_loads_it(tmp_path):
    """transformers reads pytorch_model.bin when the folder has neither model.safetensors nor an index; a stray
    other .safetensors file (an adapter) must not make armor look for safetensors weights that are not there."""
    from safetensors.torch import save_file

    from armor.storage import load_model, stored_dtype

    model = make_tiny_model(64, tie=False)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # transformers 5 writes safetensors only: pickle by hand
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    save_file({"x": torch.zeros(2)}, tmp_path / "adapter.safetensors")
    loaded = load_model(tmp_path)
    assert stored_dtype(tmp_path) == torch.float32
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(want, got), name


def _edit_folder(folder, drop=(), layers=None):
    """Remove tensors ``drop`` from the folder's weights, or set its config's ``num_hidden_layers``."""
    import json

    from safetensors.torch import load_file, save_file

    if drop:
        state = load_file(folder / "model.safetensors")
        for key in drop:
            del state[key]
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if layers is not None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))


@pytest.mark.parametrize("edit,needle", [
    ({"drop": ["model.layers.1.mlp.down_proj.weight"]}, "they lack model.layers.1.mlp.down_proj.weight"),
    ({"layers": 3}, "they lack model.layers.2."),
    ({"layers": 1}, "they hold tensors the model has no place for: model.layers.1."),
])
@pytest.mark.parametrize("mode", ["in-memory", "streamed", "eval"])
def test_dense_weights_that_do_not_cover_the_config_are_refused(capsys, tiny_model_dir, tiny_text, tmp_path, edit,
                                                              needle, mode):
    """Before: an in-memory run pruned (and eval measured) a randomly initialised down_proj, or the random third
    block of a config with more layers than the weights; with fewer layers, in memory and streamed, the weights'
    last block was dropped; every one exited 0 (transformers only logs such keys, and armor hides its log)."""
    _edit_folder(tiny_model_dir, **edit)
    if mode == "eval":
        rc, out, err = _cli(capsys, "eval", tiny_model_dir, "--eval-text", tiny_text, "--eval-seqlen", 16,
                            "--eval-windows", 1)
    else:
        rc, out, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o",
                                            *(["--streaming"] if mode == "streamed" else [])))
    assert rc == 2 and needle in err and "do not match its config.json" in err, (out, err)
    assert not (tmp_path / "o" / "armor-fast" / "model.safetensors").exists()


@pytest.mark.parametrize("args,needle", [
    (["--exclude", "down-proj"], "exclude pattern(s) ['down-proj'] match no linear layer"),
    (["--layers", "q_proj", "k-proj"], "include pattern(s) ['k-proj'] match no linear layer"),
])
def test_a_layer_pattern_that_matches_nothing_is_an_error_naming_it(capsys, tiny_model_dir, tiny_text, tmp_path,
                                                                    args, needle):
    """Before: a typo in one pattern was ignored when another matched: --exclude down-proj pruned every down_proj
    (exit 0), --layers q_proj k-proj pruned q_proj alone, neither said so."""
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", *args))
    assert rc == 2 and needle in err and "'mlp.down_proj'" in err
    assert not (tmp_path / "o" / "armor-fast").exists()
    from armor.models import find_prunable_layers

    model = make_tiny_model(64)
    assert len(find_prunable_layers(model, exclude=["down_proj"])) == 12  # every pattern matching: no error
    with pytest.raises(ValueError, match=re.escape(needle)):
        find_prunable_layers(model, include=args[1:] if args[0] == "--layers" else None,
                             exclude=args[1:] if args[0] == "--exclude" else None)


@pytest.mark.parametrize("damage,needle", [
    ("type", "hold tensors the model has no place for: model.layers.0.self_attn.q_proj.a_blocks"),
    ("drop", "do not match its config.json: they lack model.layers.0.mlp.down_proj.weight"),
])
def test_from_pretrained_refuses_a_pruned_folder_armor_load_refuses(capsys, tiny_model_dir, tiny_text, tmp_path,
                                                                    damage, needle):
    """Before: with a layer's type edited from armor to sparse, from_pretrained dropped its stored wrappers (an
    UNEXPECTED line in transformers' log) and computed another model; with a dense tensor deleted it initialised
    it randomly. armor.load refused both."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    layers = ["--layers", "q_proj"] if damage == "type" else ["--layers", "q_proj", "k_proj"]
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", *layers))
    assert rc == 0, err
    folder = tmp_path / "o" / "armor-fast"
    AutoModelForCausalLM.from_pretrained(folder)  # loads as written
    if damage == "type":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["type"] = "sparse"
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        state = load_file(folder / "model.safetensors")
        del state["model.layers.0.mlp.down_proj.weight"]
        save_file(state, folder / "model.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError):
        armor.load(folder)


def test_footprint_counts_the_linear_layers_left_dense(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: with --layers q_proj (2 of 14 linears pruned), the run, its table and armor inspect said 60.9% of
    the dense linear bytes and 57.8% of the values kept: the ratios of the pruned layers alone."""
    from armor.report import folder_footprint

    rc, stdout, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", "--layers", "q_proj"))
    assert rc == 0, err
    fp = folder_footprint(tmp_path / "o" / "armor-fast")
    dense = make_tiny_model(64)  # the sizes of the saved model: hidden 64, MLP 128, 4 heads of 16, 2 key-value heads
    per_block = {n: m.weight.numel() for n, m in dense.model.layers[0].named_modules()
                 if isinstance(m, torch.nn.Linear)}
    values, q = 2 * sum(per_block.values()), per_block["self_attn.q_proj"]
    wrappers = round(fp["wrapper_overhead"] * values)
    assert wrappers > 0
    # q_proj keeps half its entries (plus its wrappers); the other 12 linears stay dense
    assert fp["values_kept_ratio"] == pytest.approx((values - q + wrappers) / values)
    assert fp["dense_linear_bytes"] == 4 * values  # float32, no biases
    q_bytes = 2 * (q // 2 * 4 + q // 8)  # two q_proj layers: float32 values + a 2-bit position each
    assert fp["linear_bytes"] == 4 * (values - 2 * q) + q_bytes + 4 * wrappers
    assert f"linear bytes {100 * fp['linear_bytes_ratio']:.1f}% of the dense layers in the same dtype" in stdout


def test_export_onto_a_file_and_a_closed_pipe_are_said_plainly(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: `armor export X afile --overwrite` ended in "[Errno 17] File exists: 'afile'", and `armor inspect X |
    head` in "armor: error: [Errno 32] Broken pipe"."""
    import subprocess
    import sys

    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o"))
    assert rc == 0, err
    afile = tmp_path / "afile"
    afile.write_text("mine")
    rc, _, err = _cli(capsys, "export", tmp_path / "o" / "armor-fast", afile, "--overwrite")
    assert rc == 2 and f"{afile} is a file, not a folder" in err and afile.read_text() == "mine"
    script = ("import sys; from armor.cli import main; sys.exit(main(['inspect', sys.argv[1], '--layers']))")
    reader = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.close()"], stdin=subprocess.PIPE)
    reader.wait()  # the pipe's reader has gone before armor writes
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "o" / "armor-fast")], stdout=reader.stdin,
                          stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 141 and proc.stderr == ""


@pytest.mark.parametrize("args,needle", [
    (["-O", "block_size=8", "--block-size", 16],
     "option 'block_size' is given twice (by -O and --block-size), as 8 and 16"),
    (["-O", "sweeps=2"], "option 'sweeps' is given twice (by -O), as 1 and 2"),
])
def test_an_option_given_twice_with_two_values_is_an_error(capsys, tiny_model_dir, tiny_text, tmp_path, args, needle):
    """Before: the later spelling won in silence (-O block_size=8 --block-size 16 ran with blocks of 16)."""
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", *args))  # _small passes sweeps=1
    assert rc == 2 and needle in err
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", "-O", "sweeps=1"))
    assert rc == 0, err  # the same value twice is one setting


@pytest.mark.parametrize("where", ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_dense_model_with_a_non_finite_weight_is_refused_naming_it(capsys, char_tokenizer, tiny_text, tmp_path,
                                                                      where, streaming):
    """Before: a NaN in a norm weight was pruned around (its Hessian repaired, a warning) and, with --no-eval, the
    run exited 0 leaving a model whose every output is NaN."""
    folder = tmp_path / "nan-model"
    model = make_tiny_model(len(char_tokenizer))
    with torch.no_grad():
        model.get_parameter(where)[3] = float("nan")
    model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    extra = ["--streaming"] if streaming else []
    rc, _, err = _cli(capsys, *_small(folder, tiny_text, tmp_path / "o", *extra))
    assert rc == 2 and "Traceback" not in err
    assert f"the model's tensor {where} holds 1 NaN or infinite values of 64" in err
    assert not list((tmp_path / "o").rglob("config.json"))  # no model folder was finished
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 4, 48)
    with pytest.raises(ValueError, match=re.escape(f"tensor {where} holds 1 NaN")):
        armor.prune(model, ids, "magnitude")


def test_a_block_whose_activations_overflow_is_refused_naming_it(capsys, char_tokenizer, tiny_text, tmp_path):
    """Before: float16 activations that overflow to inf after the first block reached every later layer as a
    Hessian of NaN (repaired, a warning), and the run exited 0 with a model that computes NaN."""
    folder = tmp_path / "overflow"
    model = make_tiny_model(len(char_tokenizer))
    with torch.no_grad():  # finite weights; the first block's MLP output exceeds float16's 65504
        model.model.layers[0].mlp.up_proj.weight.mul_(300.0)
        model.model.layers[0].mlp.down_proj.weight.mul_(60000.0)
    model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    rc, _, err = _cli(capsys, *_small(folder, tiny_text, tmp_path / "f32", "--dtype", "float32"))
    assert rc == 0, err  # float32 holds these activations
    rc, _, err = _cli(capsys, *_small(folder, tiny_text, tmp_path / "f16", "--dtype", "float16"))
    assert rc == 2 and "Traceback" not in err
    assert "the dense model's block model.layers.0 outputs" in err and "overflow in float16" in err
    assert not list((tmp_path / "f16").rglob("config.json"))


def test_a_weights_file_from_another_save_is_refused_by_every_reader(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: a model.safetensors copied in from another run of the same shapes loaded, evaluated and inspected in
    silence, under the first run's provenance (its records, options and footprint)."""
    import shutil

    from transformers import AutoModelForCausalLM

    for run, seed in (("a", 0), ("b", 1)):
        rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / run, "--seed", seed))
        assert rc == 0, err
    a, b = tmp_path / "a" / "armor-fast", tmp_path / "b" / "armor-fast"
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    resaved = tmp_path / "resaved"  # save_pretrained records no SHA-256, in the file or in config.json
    AutoModelForCausalLM.from_pretrained(b).save_pretrained(resaved)
    armor.load(resaved)
    for source, needle in ((b, "the file records weights SHA-256"), (resaved, "the file records no weights SHA")):
        mixed = tmp_path / f"mixed-{source.name}"
        shutil.copytree(a, mixed)
        shutil.copy(source / "model.safetensors", mixed / "model.safetensors")
        said = f"{mixed / 'model.safetensors'} was not saved with {mixed / 'config.json'}: {needle}"
        with pytest.raises(CheckpointError, match=re.escape(said)):
            armor.load(mixed)
        with pytest.raises(CheckpointError, match=re.escape(said)):
            AutoModelForCausalLM.from_pretrained(mixed)
        for argv in (("inspect", mixed), ("eval", mixed, "--eval-text", tiny_text, "--eval-seqlen", 16)):
            rc, _, err = _cli(capsys, *argv)
            assert rc == 2 and said in err, err
    mixed = tmp_path / "config-from-a"  # the other way round: an armor weights file under a save_pretrained config
    shutil.copytree(resaved, mixed)
    shutil.copy(a / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(CheckpointError, match="the file records weights SHA-256 [0-9a-f]{16}.*, the config records no"):
        armor.load(mixed)


def test_inspect_check_data_finds_a_flipped_byte_the_headers_do_not_show(capsys, tiny_model_dir, tiny_text,
                                                                         tmp_path):
    from armor.storage.atomic import safetensors_digest

    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o"))
    assert rc == 0, err
    folder = tmp_path / "o" / "armor-fast"
    weights = folder / "model.safetensors"
    recorded = armor.storage.read_armor_config(folder)["weights_sha256"]
    assert safetensors_digest(weights) == recorded
    again = armor.storage.save_pruned(armor.load(folder), tmp_path / "again")  # the digest is of the content
    assert (again / "model.safetensors").read_bytes() == weights.read_bytes()
    rc, out, _ = _cli(capsys, "inspect", folder, "--check-data")
    assert rc == 0 and "values finite, SHA-256 as recorded" in out
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # one bit of the last tensor's data: the headers are unchanged
    weights.write_bytes(bytes(data))
    rc, _, err = _cli(capsys, "inspect", folder)
    assert rc == 0, err
    rc, _, err = _cli(capsys, "inspect", folder, "--check-data")
    assert rc == 2 and f"{weights}: its tensors' bytes changed since it was written" in err
    assert f"recorded {recorded}" in err


def test_a_finished_folder_whose_weights_changed_is_pruned_again_not_reused(capsys, tiny_model_dir, tiny_text,
                                                                           tmp_path, caplog):
    """Before: a rerun with the same settings found the finished folder's fingerprint, said "already pruned with
    these settings; loaded it", and evaluated and reported a model whose weights had changed since (exit 0)."""
    from transformers import AutoModelForCausalLM

    from armor.storage.verify import weights_not_as_saved

    argv = _small(tiny_model_dir, tiny_text, tmp_path / "o")
    folder = tmp_path / "o" / "armor-fast"
    rc, out, _ = _cli(capsys, *argv)
    assert rc == 0 and weights_not_as_saved(folder) is None
    saved = (folder / "model.safetensors").read_bytes()
    rc, out, _ = _cli(capsys, *argv)
    assert rc == 0 and "already pruned with these settings" in out
    data = bytearray(saved)
    data[-7] ^= 0x10
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert "its weights' SHA-256 is" in weights_not_as_saved(folder)
    rc, out, _ = _cli(capsys, *argv)
    assert rc == 0 and "already pruned" not in out
    assert "cannot be reused as saved (its weights' SHA-256 is" in caplog.text
    assert (folder / "model.safetensors").read_bytes() == saved  # pruned again: the same model as the first run
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)  # a re-save records no SHA-256: not vouched
    assert "records no weights SHA-256" in weights_not_as_saved(folder)
    rc, out, _ = _cli(capsys, *argv)
    assert rc == 0 and "already pruned" not in out and (folder / "model.safetensors").read_bytes() == saved


def test_layers_whose_wrappers_exceed_the_budget_are_named(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: a budget no wrapper blocks fit (the smallest blocks add more) gave those blocks without a word unless
    the layers then stored more than dense; the records showed 7.8-14% against the 1% asked for."""
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", "--wrapper-budget", 0.01))
    assert rc == 0, err
    warning = err.split("warning: armor-fast: no wrapper blocks fit the budget of 1% on layers of shape ")[1]
    assert warning.startswith("32x64 (1x4 blocks, 14.1%), 64x64 (1x4 blocks, 7.8%)")
    assert "the smallest blocks add that share of the dense values, so those layers' wrappers cost more" in warning
    records = armor.storage.read_armor_config(tmp_path / "o" / "armor-fast")["records"]
    assert max(r["wrapper_overhead"] for r in records) == pytest.approx(0.140625)  # what the warning said
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "p", "--wrapper-budget", 0.2))
    assert rc == 0 and "no wrapper blocks fit" not in err


def test_a_config_untying_a_head_stored_tied_is_refused_by_every_reader(capsys, tiny_model_dir, tiny_text, tmp_path):
    """Before: config.json edited to tie_word_embeddings false over weights that store the head once (tied):
    from_pretrained refused, but armor.load tied it anyway, inspect described it, and armor export wrote an untied
    folder without a head that plain transformers loads with a random one."""
    import json

    from transformers import AutoModelForCausalLM

    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o"))
    assert rc == 0, err
    folder = tmp_path / "o" / "armor-fast"
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    said = "stores lm_head.weight as model.embed_tokens.weight (a tied head, written once), but config.json says"
    with pytest.raises(CheckpointError, match=re.escape(said)):
        armor.load(folder)
    with pytest.raises(Exception, match="lm_head"):  # transformers' own refusal
        AutoModelForCausalLM.from_pretrained(folder)
    for argv in (("inspect", folder), ("export", folder, tmp_path / "dense")):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and said in err, err
    assert not (tmp_path / "dense").exists()


def test_export_overwrite_leaves_nothing_of_the_model_that_was_there(capsys, char_tokenizer, tiny_model_dir,
                                                                      tiny_text, tmp_path, caplog):
    """Before: exporting over a sharded model kept its index (naming deleted shards), and exporting a folder with
    no tokenizer over another model kept that model's tokenizer without a word."""
    import shutil

    from transformers import AutoModelForCausalLM

    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o"))
    assert rc == 0, err
    pruned = tmp_path / "o" / "armor-fast"
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(pruned, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    target = tmp_path / "target"
    make_tiny_model(len(char_tokenizer), seed=1).save_pretrained(target, max_shard_size="100KB")
    char_tokenizer.save_pretrained(target)
    assert (target / "model.safetensors.index.json").is_file() and (target / "tokenizer.json").is_file()
    rc, _, err = _cli(capsys, "export", no_tok, target, "--overwrite")
    assert rc == 0, err
    left = sorted(p.name for p in target.iterdir())
    assert left == ["config.json", "generation_config.json", "model.safetensors"], left
    assert "removed model.safetensors.index.json" in caplog.text and "removed the tokenizer files" in caplog.text
    exported = AutoModelForCausalLM.from_pretrained(target)
    ids = armor.calibration_ids(char_tokenizer, [TEXT * 12], 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, armor.load(pruned)(ids).logits, rtol=1e-5, atol=1e-5)
    rc, _, err = _cli(capsys, "export", pruned, target, "--overwrite")  # a folder with a tokenizer writes its own
    assert rc == 0 and (target / "tokenizer.json").is_file()


def test_bench_models_refuses_a_length_beyond_the_models_positions(capsys, tiny_model_dir):
    """Before: armor bench --models timed positions past max_position_embeddings (256) and exited 0, where prune and
    eval refuse such lengths."""
    rc, _, err = _cli(capsys, "bench", "--no-storage", "--models", tiny_model_dir, "--prompt-tokens", 250,
                      "--new-tokens", 7)
    assert rc == 2
    assert (f"--prompt-tokens 250 + --new-tokens 7 is longer than the max_position_embeddings (256) of "
            f"{tiny_model_dir}") in err
