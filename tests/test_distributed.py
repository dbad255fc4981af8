"""Streaming (one block in memory) and Ray-distributed pruning give the single-process results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from armor.api import load as armor_load
from armor.distributed import (
    LocalExecutor,
    ShardReader,
    make_executor,
    prune_model_parallel,
    prune_streaming,
)
from armor.model import find_prunable_layers, method_options, prune_pretrained
from armor.model.pipeline import StatsCache, calibration_ids, ids_digest
from armor.model.prune import layer_file
from conftest import TEXT, make_tiny_model

N_LAYERS = 14  # 2 blocks x (q, k, v, o, gate, up, down)
# Deterministic configurations: armor-fast's greedy mask steps use no randomness.
CONFIGS = {"nowag": {}, "armor-fast": method_options("armor-fast", iterations=2, block_size=32, seed=0)}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each Ray task uses: identical floating-point results and no oversubscription of a
    busy machine (multi-threaded small solves are slow there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(tokenizer, seed=0):
    return calibration_ids(tokenizer, [TEXT * 12], 6, 48, seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture()
def sharded_model_dir(tmp_path: Path, char_tokenizer) -> Path:
    """The tiny model saved in several safetensors shards with an index, as big checkpoints are."""
    d = tmp_path / "tiny-sharded"
    make_tiny_model(len(char_tokenizer)).save_pretrained(d, max_shard_size="60KB")
    char_tokenizer.save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _whole(tokenizer, ids, method, out):
    model = make_tiny_model(len(tokenizer))
    prune_pretrained(model, tokenizer, ids, method, CONFIGS[method], out_dir=out, batch_size=4,
                     progress=False)
    return model


def _same_layer_files(a: Path, b: Path, names) -> list[str]:
    """Layers whose saved tensors differ between two output folders."""
    differ = []
    for name in names:
        with safe_open(str(layer_file(a, name)), "pt") as fa, \
                safe_open(str(layer_file(b, name)), "pt") as fb:
            keys = sorted(fa.keys())
            same = keys == sorted(fb.keys())
            same = same and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)
            if not same:
                differ.append(name)
    return differ


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("method", list(CONFIGS))
def test_streaming_one_pass_equals_whole_model(method, sharded_model_dir, char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    whole = _whole(char_tokenizer, ids, method, tmp_path / "whole")
    out = tmp_path / "stream"
    run = prune_streaming(sharded_model_dir, ids, method, CONFIGS[method], out_dir=out,
                          tokenizer=char_tokenizer, batch_size=4, progress=False)
    names = list(find_prunable_layers(make_tiny_model(len(char_tokenizer))))
    assert [r.name for r in run.records] == names and run.resumed == 0
    assert _same_layer_files(tmp_path / "whole", out, names) == []
    for a, b in zip(_records(tmp_path / "whole"), _records(out), strict=True):
        assert (a["name"], a["loss"], a["nowag_loss"]) == (b["name"], b["loss"], b["nowag_loss"])
    loaded = armor_load(out)
    assert torch.equal(_logits(loaded, ids), _logits(whole, ids))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # ties survive
    section = json.loads((out / "config.json").read_text())["armor"]
    assert section["streaming"] and section["calibration"]["mode"] == "one-pass"
    assert len(section["layers"]) == N_LAYERS
    assert not (out / ".activations").exists()  # temporary activations are gone


def test_streaming_sequential_runs_and_differs(sharded_model_dir, char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    kw = dict(tokenizer=char_tokenizer, batch_size=4, progress=False)
    prune_streaming(sharded_model_dir, ids, "nowag", out_dir=tmp_path / "one", **kw)
    run = prune_streaming(sharded_model_dir, ids, "nowag", out_dir=tmp_path / "seq",
                          calibration_mode="sequential", **kw)
    assert len(run.records) == N_LAYERS
    names = [r.name for r in run.records]
    differ = _same_layer_files(tmp_path / "one", tmp_path / "seq", names)
    # The first block sees the same (embedding) inputs either way; the second sees the pruned first block.
    assert differ and all(n.startswith("model.layers.1.") for n in differ)
    assert all(n in differ for n in names if n.startswith("model.layers.1.mlp"))
    seq = armor_load(tmp_path / "seq")
    assert not torch.equal(_logits(seq, ids), _logits(armor_load(tmp_path / "one"), ids))
    section = json.loads((tmp_path / "seq" / "config.json").read_text())["armor"]
    assert section["calibration"]["mode"] == "sequential"
    # sequential results carry their own fingerprint: a one-pass run never reuses them
    again = prune_streaming(sharded_model_dir, ids, "nowag", out_dir=tmp_path / "seq", **kw)
    assert again.resumed == 0


class _Killed(Exception):
    pass


def test_streaming_resume_and_offload(sharded_model_dir, char_tokenizer, tmp_path):
    """A killed streaming run resumes from its layer files; activations spilled to disk change nothing; the
    whole-model run's files are reused by a one-pass streaming run (same format and fingerprints)."""
    ids = _ids(char_tokenizer)
    out = tmp_path / "s"
    seen: list[str] = []

    def die_after_nine(name, rec):
        seen.append(name)
        if len(seen) == 9:
            raise _Killed

    with pytest.raises(_Killed):
        prune_streaming(sharded_model_dir, ids, "nowag", out_dir=out, batch_size=4, progress=False,
                        callback=die_after_nine)
    assert len(list((out / "layers").glob("*.safetensors"))) == 9 and not (out / "config.json").exists()
    run = prune_streaming(sharded_model_dir, ids, "nowag", out_dir=out, batch_size=4, progress=False,
                          activation_budget=0, offload_dir=tmp_path / "spill")
    assert run.resumed == 9 and len(run.records) == N_LAYERS
    assert list((tmp_path / "spill").iterdir()) == []  # spilled activations removed
    _whole(char_tokenizer, ids, "nowag", tmp_path / "whole")
    assert _same_layer_files(tmp_path / "whole", out, [r.name for r in run.records]) == []
    assert torch.equal(_logits(armor_load(out), ids), _logits(armor_load(tmp_path / "whole"), ids))
    reused = prune_streaming(sharded_model_dir, ids, "nowag", out_dir=tmp_path / "whole", batch_size=4,
                             progress=False)
    assert reused.resumed == N_LAYERS


def test_streaming_errors(tmp_path, char_tokenizer, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ShardReader(tmp_path / "empty")
    with pytest.raises(ValueError, match="calibration mode"):
        prune_streaming(tiny_model_dir, _ids(char_tokenizer), "nowag", out_dir=tmp_path / "o",
                        calibration_mode="bogus")


def test_parallel_loop_in_process_equals_prune_model(char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    ref = _whole(char_tokenizer, ids, "armor-fast", tmp_path / "ref")
    model = make_tiny_model(len(char_tokenizer))
    layers = find_prunable_layers(model)
    run = prune_model_parallel(model, layers, StatsCache(ids, 4, progress=False).provider(model, layers),
                               "armor-fast", CONFIGS["armor-fast"], out_dir=tmp_path / "par",
                               run_fingerprint=ids_digest(ids), executor=LocalExecutor(), progress=False)
    assert len(run.records) == N_LAYERS
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    assert _same_layer_files(tmp_path / "ref", tmp_path / "par", list(layers)) == []
    assert isinstance(make_executor(), LocalExecutor)


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ImportError, match=r"armor-prune\[distributed\]"):
        make_executor(workers=2)


# ------------------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from armor.distributed.ray_backend import init_ray

    started = init_ray(workers=2)
    yield ray
    if started:
        ray.shutdown()


def test_ray_two_workers_identical_even_after_a_worker_dies(ray_cluster, sharded_model_dir, char_tokenizer,
                                                            tmp_path):
    from armor.distributed import RayExecutor

    ids = _ids(char_tokenizer)
    ref = _whole(char_tokenizer, ids, "armor-fast", tmp_path / "ref")
    victim = "model.layers.1.self_attn.o_proj"
    marker, log = tmp_path / "killed-once", tmp_path / "attempts.log"

    # Defined inside the test so that Ray ships it by value; runs in the worker before each attempt.
    def kill_worker_once(name, marker=str(marker), log=str(log), victim=victim):
        import os

        with open(log, "a") as f:
            f.write(f"{name} {os.getpid()}\n")
        if name == victim and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-run, as with a crash or an OOM kill

    executor = RayExecutor(hook=kill_worker_once, max_retries=2)
    assert not executor._owns  # the module's cluster: 2 CPUs on the loopback interface
    model = make_tiny_model(len(char_tokenizer))
    layers = find_prunable_layers(model)
    out = tmp_path / "ray"
    run = prune_model_parallel(model, layers, StatsCache(ids, 4, progress=False).provider(model, layers),
                               "armor-fast", CONFIGS["armor-fast"], out_dir=out,
                               run_fingerprint=ids_digest(ids), executor=executor, progress=False)
    attempts = [line.split() for line in log.read_text().splitlines()]
    by_layer = {}
    for name, pid in attempts:
        by_layer.setdefault(name, []).append(pid)
    assert marker.exists() and len(by_layer[victim]) == 2  # the killed layer was redone ...
    assert all(len(p) == 1 for n, p in by_layer.items() if n != victim)  # ... and only that one
    assert len({pid for _, pid in attempts}) >= 2  # by two worker processes at least
    assert [r.name for r in run.records] == list(layers) and run.resumed == 0
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    assert _same_layer_files(tmp_path / "ref", out, list(layers)) == []
    assert sorted(r["name"] for r in _records(out)) == sorted(layers)

    # Streaming one-pass with its layer jobs on Ray: the same files again.
    stream = prune_streaming(sharded_model_dir, ids, "armor-fast", CONFIGS["armor-fast"],
                             out_dir=tmp_path / "sr", batch_size=4, executor=RayExecutor(), progress=False)
    assert stream.resumed == 0
    assert _same_layer_files(tmp_path / "ref", tmp_path / "sr", list(layers)) == []
    assert torch.equal(_logits(armor_load(tmp_path / "sr"), ids), _logits(ref, ids))
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # local Ray stays on loopback


# ------------------------------------------------------------------------------------------------------- CLI
def _cli_prune(capsys, model_dir, text, out, *extra):
    from armor.cli import main

    argv = ["prune", "--model", model_dir, "--calib-text", text, "--nsamples", 4, "--seqlen", 48, "--no-eval",
            "--method", "nowag", "--compare", "none", "--quiet", "--keep-layers", "--output", out, *extra]
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


def test_cli_streaming_and_sequential(capsys, tiny_model_dir, tiny_text, tmp_path):
    _cli_prune(capsys, tiny_model_dir, tiny_text, tmp_path / "whole")
    _cli_prune(capsys, tiny_model_dir, tiny_text, tmp_path / "stream", "--streaming")
    names = [r["name"] for r in _records(tmp_path / "whole" / "nowag")]
    assert len(names) == N_LAYERS
    assert _same_layer_files(tmp_path / "whole" / "nowag", tmp_path / "stream" / "nowag", names) == []
    section = json.loads((tmp_path / "stream" / "nowag" / "config.json").read_text())["armor"]
    assert section["streaming"] and section["calibration"]["mode"] == "one-pass"

    # sequential implies streaming; a finished one-pass folder is not taken for a sequential one
    out = _cli_prune(capsys, tiny_model_dir, tiny_text, tmp_path / "stream", "--calibration-mode", "sequential")
    assert "already pruned" not in out
    section = json.loads((tmp_path / "stream" / "nowag" / "config.json").read_text())["armor"]
    assert section["calibration"]["mode"] == "sequential"
    out = _cli_prune(capsys, tiny_model_dir, tiny_text, tmp_path / "stream", "--calibration-mode", "sequential")
    assert "already pruned" in out


def test_cli_workers_on_ray(ray_cluster, capsys, tiny_model_dir, tiny_text, tmp_path):
    _cli_prune(capsys, tiny_model_dir, tiny_text, tmp_path / "whole")
    _cli_prune(capsys, tiny_model_dir, tiny_text, tmp_path / "ray", "--workers", 2)
    names = [r["name"] for r in _records(tmp_path / "whole" / "nowag")]
    assert _same_layer_files(tmp_path / "whole" / "nowag", tmp_path / "ray" / "nowag", names) == []
    assert ray_cluster.is_initialized()  # the CLI joined the running Ray and left it running
