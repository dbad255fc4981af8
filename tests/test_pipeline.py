"""The one pruning driver on a tiny random Llama: every method x source x executor x calibration mode, resume,
save/load/export, the statistics rule, and a streamed run that never holds the whole model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import armor
from armor.calibration import StatsHooks
from armor.eval import perplexity
from armor.models import find_decoder_layers, find_prunable_layers, name_matches
from armor.pipeline import CheckpointSource, LocalExecutor, RayExecutor, prune
from armor.pipeline import jobs as jobs_module
from armor.pipeline.evaluate import perplexity_blockwise
from armor.runtime.packing import unpack_mask
from armor.sparsity import is_nm_mask
from armor.storage import export_dense, load_pruned
from armor.storage.resume import layer_file
from armor.text import calibration_sequences, read_documents, tokenize_documents
from conftest import TEXT, make_tiny_model

N_LAYERS = 14  # 2 blocks x (q, k, v, o, gate, up, down)

# Small budgets keep the ARMOR solvers fast; block 16 because the default budget cannot be met on 64-wide layers.
OPTIONS = {
    "armor": {"iterations": 5, "block_size": 16},
    "armor-fast": {"sweeps": 2, "block_size": 16},
    "armor-bh": {"sweeps": 2, "block_size": 16},
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each Ray task uses: identical floating-point results across executors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(tokenizer, nsamples=6, seqlen=48, seed=0):
    return armor.calibration_ids(tokenizer, [TEXT * 12], nsamples, seqlen, seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture()
def sharded_model_dir(tmp_path: Path, char_tokenizer) -> Path:
    """The tiny model in several safetensors shards with an index, as big checkpoints are."""
    d = tmp_path / "tiny-sharded"
    make_tiny_model(len(char_tokenizer)).save_pretrained(d, max_shard_size="60KB")
    char_tokenizer.save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _layer_tensors(out: Path, names) -> dict[str, dict[str, torch.Tensor]]:
    got = {}
    for name in names:
        with safe_open(str(layer_file(out, name)), "pt") as f:
            got[name] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return got


def _same_files(a: Path, b: Path, names) -> list[str]:
    ta, tb = _layer_tensors(a, names), _layer_tensors(b, names)
    return [
        n for n in names
        if sorted(ta[n]) != sorted(tb[n]) or not all(torch.equal(ta[n][k], tb[n][k]) for k in ta[n])
    ]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in ("seconds", "resumed")} for r in recs]


# ------------------------------------------------------------------------------------------ layer selection
def test_find_layers_and_patterns(tiny_model):
    prefix, blocks = find_decoder_layers(tiny_model)
    assert prefix == "model.layers" and len(blocks) == 2
    layers = find_prunable_layers(tiny_model)
    assert len(layers) == N_LAYERS
    assert all("lm_head" not in n and "embed" not in n for n in layers)
    assert list(layers)[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert set(find_prunable_layers(tiny_model, include=["q_proj"])) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    }
    assert len(find_prunable_layers(tiny_model, include=["mlp.*"], exclude=["layers.1.*"])) == 3
    assert len(find_prunable_layers(tiny_model, include=[r"re:layers\.1\..*(up|down)_proj$"])) == 2
    assert name_matches("model.layers.3.mlp.up_proj", "model.layers.3.*")
    with pytest.raises(ValueError, match="no prunable layers"):
        find_prunable_layers(tiny_model, include=["nothing_like_this"])
    with pytest.raises(ValueError, match="bad layer pattern"):
        find_prunable_layers(tiny_model, include=["re:("])


# ----------------------------------------------------------------------------------------------- calibration
def test_stats_hooks_match_direct_inputs_and_share(tiny_model, char_tokenizer):
    ids = _ids(char_tokenizer)
    layers = find_prunable_layers(tiny_model)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: captured[n].append(a[0].detach().clone()))
        for n, m in layers.items()
    ]
    _logits(tiny_model, ids)
    for h in handles:
        h.remove()
    kinds = {n: ("full" if "mlp" in n else "diagonal") for n in layers}
    hooks = StatsHooks(layers, kinds)
    for s in range(0, ids.shape[0], 4):
        hooks.new_batch()
        _logits(tiny_model, ids[s : s + 4])
    stats = hooks.finish()
    for name, st in stats.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[name]]).float()
        assert st.n_tokens == x.shape[0] == ids.numel()
        torch.testing.assert_close(st.hessian_diag, 2 * x.square().mean(0), rtol=1e-5, atol=1e-6)
        if kinds[name] == "full":
            torch.testing.assert_close(st.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        else:
            assert st.hessian is None
    # q/k/v (and gate/up) see the same tensor, so they share one statistics object.
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert stats["model.layers.0.mlp.gate_proj"] is stats["model.layers.0.mlp.up_proj"]
    assert stats["model.layers.0.self_attn.o_proj"] is not q


def test_calibration_text_errors(char_tokenizer, tmp_path):
    tokens = tokenize_documents(char_tokenizer, ["abc " * 50])
    assert calibration_sequences(tokens, 4, 32).shape == (4, 32)
    with pytest.raises(ValueError, match="larger than"):
        calibration_sequences(tokens, 1, 10_000)
    with pytest.raises(ValueError, match="nsamples=100"):
        calibration_sequences(tokens, 100, 32)
    with pytest.raises(ValueError, match="empty"):
        tokenize_documents(char_tokenizer, ["", "  \n"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_documents(empty)
    cor = tmp_path / "docs.cor"
    cor.write_text("first doc\nsecond doc\n\n")
    assert read_documents(cor) == ["first doc", "second doc"]


def test_bad_driver_input_is_a_clear_error(tiny_model, char_tokenizer, tmp_path, tiny_model_dir):
    ids = _ids(char_tokenizer)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        prune(tiny_model, ids, "bogus", output=out)
    with pytest.raises(TypeError, match="takes no option 'sweeps'.*iterations"):
        prune(tiny_model, ids, "armor", options={"sweeps": 3}, output=out)
    with pytest.raises(TypeError, match="takes no option 'block_size'"):
        prune(tiny_model, ids, "sparsegpt", options={"block_size": 3}, output=out)  # its batch is column_batch
    with pytest.raises(ValueError, match="calibration mode"):
        prune(tiny_model, ids, "nowag", mode="sometimes", output=out)
    with pytest.raises(ValueError, match=r"\(nsamples, seqlen\)"):
        prune(tiny_model, ids[0], "nowag", output=out)
    with pytest.raises(ValueError, match="needs an output folder"):
        prune(tiny_model_dir, ids, "nowag")
    assert not out.exists()  # refused before anything was written
    assert all(isinstance(m, torch.nn.Linear) for n, m in tiny_model.named_modules() if n.endswith("proj"))


# ------------------------------------------------------------- every method: save, load, export, evaluate
@pytest.mark.parametrize("method", list(armor.METHODS))
def test_prune_save_load_export_eval(method, char_tokenizer, tmp_path):
    model = make_tiny_model(len(char_tokenizer))
    ids = _ids(char_tokenizer)
    out = tmp_path / method
    run = prune(model, ids, method, options=OPTIONS.get(method), output=out, tokenizer=char_tokenizer)
    assert run.model is model and len(run.records) == N_LAYERS and run.resumed == 0
    for rec in run.records:
        assert 0 <= rec.loss <= 1.5 and rec.method == method
        if method in ("armor", "armor-fast", "armor-bh", "nowag"):
            assert rec.loss <= rec.nowag_loss + 1e-6  # armor-bh: both under its own objective
    pruned_logits = _logits(model, ids)

    cfg_section = armor.storage.read_armor_config(out)
    assert cfg_section["method"] == method and len(cfg_section["layers"]) == N_LAYERS
    assert cfg_section["options"] == armor.METHODS[method].resolve(OPTIONS.get(method))
    assert len(_records(out)) == N_LAYERS
    assert not (out / "layers").exists()  # resume files go once the model is saved
    loaded = load_pruned(out)
    assert torch.equal(_logits(loaded, ids), pruned_logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # ties survive
    for name in find_prunable_layers(make_tiny_model(len(char_tokenizer))):
        mod = loaded.get_submodule(name)
        # the stored core is exactly 2:4 for every method, ARMOR included
        assert is_nm_mask(unpack_mask(mod.indices, mod.out_features, mod.in_features, 2, 4), 2, 4)
        if not armor.METHODS[method].wrappers:  # no wrappers: the weight itself is 2:4
            w = mod.dense_weight()
            assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2

    dense_dir = export_dense(out, tmp_path / f"{method}-dense")
    hf = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    torch.testing.assert_close(_logits(hf, ids), pruned_logits, rtol=1e-4, atol=1e-4)

    # perplexity equals an independent computation from the loaded model's logits
    windows = tokenize_documents(char_tokenizer, [TEXT * 12])[: 4 * 48].reshape(4, 48)
    ppl = perplexity(loaded, windows.reshape(-1), seqlen=48)
    logits = _logits(loaded, windows)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert ppl.windows == 4 and math.isclose(ppl.ppl, math.exp(float(nll)), rel_tol=1e-5)


def test_untied_embeddings_and_dtype(char_tokenizer, tmp_path):
    model = make_tiny_model(len(char_tokenizer), tie=False)
    ids = _ids(char_tokenizer)
    prune(model, ids, "wanda", output=tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    half = load_pruned(tmp_path / "m", dtype="bfloat16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(half, ids).float()).all()


# ----------------------------------------------- one-pass: identical across sources and executors, every method
@pytest.mark.parametrize("method", list(armor.METHODS))
def test_one_pass_identical_in_memory_and_streamed(method, sharded_model_dir, char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    model = make_tiny_model(len(char_tokenizer))
    opts = OPTIONS.get(method)
    prune(model, ids, method, options=opts, output=tmp_path / "mem", keep_layer_files=True, batch_size=4)
    prune(sharded_model_dir, ids, method, options=opts, output=tmp_path / "str", keep_layer_files=True,
          batch_size=4, tokenizer=char_tokenizer)
    names = list(find_prunable_layers(make_tiny_model(len(char_tokenizer))))
    assert _same_files(tmp_path / "mem", tmp_path / "str", names) == []
    assert _strip(_records(tmp_path / "mem")) == _strip(_records(tmp_path / "str"))
    assert torch.equal(_logits(load_pruned(tmp_path / "str"), ids), _logits(model, ids))


def test_magnitude_losses_weighted_the_same_everywhere(sharded_model_dir, char_tokenizer, tmp_path):
    """The statistics rule: magnitude's mask ignores statistics but its recorded loss is weighted by the Hessian
    diagonal in every source and executor (the old Ray/streaming paths recorded unweighted losses)."""
    ids = _ids(char_tokenizer)
    model = make_tiny_model(len(char_tokenizer))
    run = prune(model, ids, "magnitude", output=tmp_path / "mem")
    streamed = prune(sharded_model_dir, ids, "magnitude", output=tmp_path / "str")
    assert [r.loss for r in run.records] == [r.loss for r in streamed.records]
    # weighted: different from the plain Frobenius loss of the same pruned weight
    ref = make_tiny_model(len(char_tokenizer))
    name = run.records[0].name
    w = ref.get_submodule(name).weight.detach()
    plain = armor.prune_layer(w, None, "magnitude").loss
    assert plain != pytest.approx(run.records[0].loss, rel=1e-3)


# ------------------------------------------------------------------------------------------ sequential mode
@pytest.mark.parametrize("source", ["memory", "streamed"])
def test_sequential_equals_direct_recomputation(source, sharded_model_dir, char_tokenizer, tmp_path, monkeypatch):
    """Each layer's statistics in sequential mode equal those recomputed directly from a model whose earlier
    blocks are already pruned (and whose own block is still dense)."""
    ids = _ids(char_tokenizer)
    seen: dict[str, torch.Tensor] = {}
    real_run = jobs_module.run_layer_job

    def spy(job):
        seen[job.name] = job.stats.hessian_diag.clone()
        return real_run(job)

    monkeypatch.setattr(jobs_module, "run_layer_job", spy)
    monkeypatch.setattr("armor.pipeline.executors.run_layer_job", spy)
    target = make_tiny_model(len(char_tokenizer)) if source == "memory" else sharded_model_dir
    run = prune(target, ids, "nowag", mode="sequential", output=tmp_path / "seq", batch_size=4, keep_layer_files=True)
    seen = dict(seen)
    monkeypatch.undo()
    one = prune(make_tiny_model(len(char_tokenizer)), ids, "nowag", output=tmp_path / "one", batch_size=4)

    # direct recomputation: block 0 from the dense model; block 1 with block 0's pruned modules in place
    ref = make_tiny_model(len(char_tokenizer))
    layers = find_prunable_layers(ref)
    pruned0 = load_pruned(tmp_path / "seq")
    for name in layers:
        if name.startswith("model.layers.0."):
            armor.models.set_module(ref, name, pruned0.get_submodule(name))
    hooks = StatsHooks({n: m for n, m in layers.items() if n.startswith("model.layers.1.")},
                       {n: "diagonal" for n in layers})
    for s in range(0, ids.shape[0], 4):
        hooks.new_batch()
        _logits(ref, ids[s : s + 4])
    direct = hooks.finish()
    for name, st in direct.items():
        torch.testing.assert_close(seen[name], st.hessian_diag, rtol=1e-5, atol=1e-7)
    # and block 1 really saw the pruning of block 0: its statistics differ from one-pass
    assert [r.nowag_loss for r in run.records[7:]] != [r.nowag_loss for r in one.records[7:]]
    assert [r.nowag_loss for r in run.records[:7]] == [r.nowag_loss for r in one.records[:7]]
    assert armor.storage.read_armor_config(tmp_path / "seq")["calibration"]["mode"] == "sequential"


# ---------------------------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


@pytest.mark.parametrize("source", ["memory", "streamed"])
@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_killed_run_resumes(source, mode, sharded_model_dir, char_tokenizer, tmp_path, monkeypatch):
    calls: list[str] = []
    real = jobs_module.prune_layer

    def counting(weight, *a, **k):
        calls.append(tuple(weight.shape))
        return real(weight, *a, **k)

    monkeypatch.setattr(jobs_module, "prune_layer", counting)
    ids = _ids(char_tokenizer)
    out = tmp_path / "run"

    def target():
        return make_tiny_model(len(char_tokenizer)) if source == "memory" else sharded_model_dir

    def die_after_nine(name, rec):
        if len(calls) == 9:  # in the second block
            raise _Killed

    with pytest.raises(_Killed):
        prune(target(), ids, "wanda", mode=mode, output=out, callback=die_after_nine)
    assert len(list((out / "layers").glob("*.safetensors"))) == 9
    assert not (out / "config.json").exists()  # never looks finished
    (out / "layers" / ".junk.safetensors.tmp").write_bytes(b"partial")  # a kill's leftover is ignored

    calls.clear()
    run = prune(target(), ids, "wanda", mode=mode, output=out, keep_layer_files=True)
    assert len(calls) == N_LAYERS - 9 and run.resumed == 9
    ref = prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", mode=mode, output=tmp_path / "ref",
                keep_layer_files=True)
    assert _strip([r.to_json() for r in run.records]) == _strip([r.to_json() for r in ref.records])
    assert torch.equal(_logits(load_pruned(out), ids), _logits(load_pruned(tmp_path / "ref"), ids))

    # the finished folder is recognised: nothing pruned again
    calls.clear()
    again = prune(target(), ids, "wanda", mode=mode, output=out)
    assert calls == [] and again.already_done

    # a damaged layer file is redone, never trusted; other calibration data never reuses files
    (out / "config.json").unlink()
    victim = layer_file(out, "model.layers.1.mlp.up_proj")
    victim.write_bytes(victim.read_bytes()[:100])
    calls.clear()
    prune(target(), ids, "wanda", mode=mode, output=out, keep_layer_files=True)
    assert len(calls) == 1
    calls.clear()
    prune(target(), _ids(char_tokenizer, seed=1), "wanda", mode=mode, output=out, keep_layer_files=True)
    assert len(calls) == N_LAYERS
    calls.clear()
    prune(target(), ids, "wanda", mode=mode, output=out, resume=False)
    assert len(calls) == N_LAYERS


def test_old_layer_files_are_refused_with_a_message(char_tokenizer, tmp_path, caplog):
    ids = _ids(char_tokenizer)
    out = tmp_path / "run"
    prune(make_tiny_model(len(char_tokenizer)), ids, "nowag", output=out, keep_layer_files=True)
    (out / "config.json").unlink()
    path = layer_file(out, "model.layers.0.self_attn.q_proj")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={**meta, "format": "armor-layer-v1"})
    with caplog.at_level("WARNING"):
        run = prune(make_tiny_model(len(char_tokenizer)), ids, "nowag", output=out)
    assert run.resumed == N_LAYERS - 1
    assert "older armor" in caplog.text and "q_proj" in caplog.text


# --------------------------------------------------------------------------------- streaming stays bounded
def test_streamed_run_never_holds_the_whole_model(sharded_model_dir, char_tokenizer, tmp_path, monkeypatch):
    """Calibration, pruning, saving and block-wise evaluation each hold at most one decoder block of weights."""
    real_blocks: list[int] = []
    original_load = CheckpointSource.load_block

    def watched_load(self, index):
        block = original_load(self, index)
        live = [i for i, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]
        real_blocks.append(len(live))
        return block

    def no_whole_model(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(CheckpointSource, "load_block", watched_load)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_whole_model)
    ids = _ids(char_tokenizer)
    out = tmp_path / "s"
    for mode in ("one-pass", "sequential"):
        prune(sharded_model_dir, ids, "nowag", mode=mode, output=out / mode, tokenizer=char_tokenizer)
    tokens = tokenize_documents(char_tokenizer, [TEXT * 12])
    ppl = perplexity_blockwise(out / "one-pass", tokens, seqlen=48, batch_size=3)
    assert real_blocks and max(real_blocks) == 1
    monkeypatch.undo()
    ref = perplexity(load_pruned(out / "one-pass"), tokens, seqlen=48, batch_size=3)
    assert ppl.ppl == pytest.approx(ref.ppl, rel=1e-6) and ppl.windows == ref.windows


# ------------------------------------------------------------------------------------------------------ Ray
def test_a_cluster_gets_the_drivers_heap_settings_and_the_callers_runtime_env_wins(monkeypatch):
    """A cluster's nodes were started without armor's GLIBC_TUNABLES (glibc reads them at process start): the
    connection's runtime_env hands them to its workers; a local Ray's workers inherit them and get none."""
    import armor.pipeline.ray_executor as rx

    calls = []

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(rx, "import_ray", FakeRay)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    rx.init_ray(address="auto")
    assert calls[-1]["runtime_env"] == {"env_vars": {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}}
    given = {"pip": ["x"], "env_vars": {"GLIBC_TUNABLES": "mine", "A": "1"}}
    rx.init_ray(address="auto", runtime_env=given)
    assert calls[-1]["runtime_env"] == {"pip": ["x"], "env_vars": {"GLIBC_TUNABLES": "mine", "A": "1"}}
    assert given == {"pip": ["x"], "env_vars": {"GLIBC_TUNABLES": "mine", "A": "1"}}  # the caller's dict untouched
    rx.init_ray(workers=1)
    assert "runtime_env" not in calls[-1]
    monkeypatch.delenv("GLIBC_TUNABLES")
    rx.init_ray(address="auto")
    assert "runtime_env" not in calls[-1]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from armor.pipeline.ray_executor import init_ray

    started = init_ray(workers=2)
    yield ray
    if started:
        ray.shutdown()


def test_every_method_on_ray_equals_in_process(ray_cluster, sharded_model_dir, char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    names = list(find_prunable_layers(make_tiny_model(len(char_tokenizer))))
    executor = RayExecutor()
    for method in armor.METHODS:
        opts = OPTIONS.get(method)
        ref = tmp_path / f"{method}-local"
        prune(make_tiny_model(len(char_tokenizer)), ids, method, options=opts, output=ref, keep_layer_files=True,
              batch_size=4, executor=LocalExecutor())
        for source in ("memory", "streamed"):
            target = make_tiny_model(len(char_tokenizer)) if source == "memory" else sharded_model_dir
            out = tmp_path / f"{method}-ray-{source}"
            prune(target, ids, method, options=opts, output=out, keep_layer_files=True, batch_size=4,
                  executor=executor)
            assert _same_files(ref, out, names) == [], (method, source)
            assert _strip(_records(ref)) == _strip(_records(out)), (method, source)
    executor.close()


def test_ray_worker_death_redoes_only_its_layer(ray_cluster, char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
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

    ref = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", options=OPTIONS["armor-fast"],
                output=tmp_path / "ref", keep_layer_files=True)
    with RayExecutor(hook=kill_worker_once, max_retries=2) as executor:
        model = make_tiny_model(len(char_tokenizer))
        run = prune(model, ids, "armor-fast", options=OPTIONS["armor-fast"], output=tmp_path / "ray",
                    keep_layer_files=True, executor=executor)
    attempts = [line.split() for line in log.read_text().splitlines()]
    by_layer: dict[str, list[str]] = {}
    for name, pid in attempts:
        by_layer.setdefault(name, []).append(pid)
    assert marker.exists() and len(by_layer[victim]) == 2  # the killed layer was redone ...
    assert all(len(p) == 1 for n, p in by_layer.items() if n != victim)  # ... and only that one
    assert [r.name for r in run.records] == [r.name for r in ref.records]
    assert torch.equal(_logits(model, ids), _logits(load_pruned(tmp_path / "ref"), ids))


def test_missing_ray_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ImportError, match=r"armor-prune\[distributed\]"):
        armor.pipeline.make_executor(workers=2)


def test_unreachable_ray_address_is_a_clear_error(monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already running in this process")
    with pytest.raises(ConnectionError, match="could not connect to the Ray cluster at 127.0.0.1:1"):
        RayExecutor(address="127.0.0.1:1")


@pytest.mark.parametrize("source", ["memory", "streamed"])
def test_killed_ray_run_resumes(ray_cluster, source, sharded_model_dir, char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    out = tmp_path / "run"

    def target():
        return make_tiny_model(len(char_tokenizer)) if source == "memory" else sharded_model_dir

    seen: list[str] = []

    def die_after_five(name, rec):
        seen.append(name)
        if len(seen) == 5:
            raise _Killed

    with RayExecutor() as executor, pytest.raises(_Killed):
        prune(target(), ids, "sparsegpt", mode="sequential", output=out, executor=executor, callback=die_after_five)
    finished = len(list((out / "layers").glob("*.safetensors")))
    assert 5 <= finished < N_LAYERS and not (out / "config.json").exists()
    with RayExecutor() as executor:
        run = prune(target(), ids, "sparsegpt", mode="sequential", output=out, executor=executor,
                    keep_layer_files=True)
    assert run.resumed == finished
    ref = prune(make_tiny_model(len(char_tokenizer)), ids, "sparsegpt", mode="sequential", output=tmp_path / "ref",
                keep_layer_files=True)
    assert _strip([r.to_json() for r in run.records]) == _strip([r.to_json() for r in ref.records])


# ------------------------------------------------------------------------------- the guarantee, as stored
def test_guarantee_checked_in_the_stored_dtype(char_tokenizer, tmp_path, monkeypatch):
    ids = _ids(char_tokenizer)
    model = make_tiny_model(len(char_tokenizer)).to(torch.bfloat16)
    run = prune(model, ids, "armor-fast", options=OPTIONS["armor-fast"], output=tmp_path / "bf16")
    for rec in run.records:
        check = rec.extra["stored_check"]
        assert check["dtype"] == "bfloat16"
        kept, other = (check["loss"], check["nowag_loss"]) if check["kept"] == "armor-fast" else (
            check["nowag_loss"], check["loss"])
        assert kept <= other
    # recomputed from the saved factors and the dense model's statistics: the kept module's loss is the recorded
    # stored loss
    loaded = load_pruned(tmp_path / "bf16")
    ref = make_tiny_model(len(char_tokenizer)).to(torch.bfloat16)
    hooks = StatsHooks({r.name: ref.get_submodule(r.name) for r in run.records},
                       {r.name: "diagonal" for r in run.records})
    _logits(ref, ids)
    dense_stats = hooks.finish()
    for rec in run.records:
        check = rec.extra["stored_check"]
        recorded = check["loss"] if check["kept"] == "armor-fast" else check["nowag_loss"]
        w = ref.get_submodule(rec.name).weight.detach()
        stored = armor.solvers.layer_proxy_loss(w, dense_stats[rec.name], loaded.get_submodule(rec.name).dense_weight())
        assert stored == pytest.approx(recorded, rel=1e-3)
    name = run.records[0].name
    st = armor.LayerStats(torch.ones(64))  # any weighting: compare the two ways of computing it
    w = ref.get_submodule(name).weight.detach()
    direct = armor.solvers.layer_proxy_loss(w, st, loaded.get_submodule(name).dense_weight())
    assert direct == pytest.approx(armor.solvers.layer_proxy_loss(w, st, model.get_submodule(name).dense_weight()))

    # where rounding would break the guarantee, the layer falls back to NoWag-P stored the same way
    real = jobs_module.layer_proxy_loss
    calls = {"n": 0}

    def pessimistic(weight, stats, w_hat):
        calls["n"] += 1
        loss = real(weight, stats, w_hat)
        return loss + 1.0 if calls["n"] % 2 == 1 else loss  # the first call of each layer is ARMOR's

    monkeypatch.setattr(jobs_module, "layer_proxy_loss", pessimistic)
    model = make_tiny_model(len(char_tokenizer)).to(torch.bfloat16)
    run = prune(model, ids, "armor-fast", options=OPTIONS["armor-fast"])
    assert all(r.extra["stored_check"]["kept"] == "nowag" for r in run.records)
    assert all(type(model.get_submodule(r.name)).__name__ == "SparseLinear" for r in run.records)
    assert all(r.loss == pytest.approx(r.nowag_loss) for r in run.records)


def test_ray_workers_without_the_drivers_disk(ray_cluster, char_tokenizer, tmp_path, monkeypatch):
    """A worker whose output folder is not the driver's (here: a relative output path and a worker in another
    directory): the driver writes the layer files it receives, so the save and a resume find them."""
    ids = _ids(char_tokenizer)
    driver, elsewhere = tmp_path / "driver", tmp_path / "worker-disk"
    driver.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(driver)

    def move_worker(name, where=str(elsewhere)):
        import os

        os.chdir(where)  # the worker's "run/layers" is now another folder than the driver's

    with RayExecutor(hook=move_worker) as executor:
        run = prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", output="run", executor=executor,
                    keep_layer_files=True)
        assert len(list((driver / "run" / "layers").glob("*.safetensors"))) == N_LAYERS
        assert not (elsewhere / "run").exists()
        (driver / "run" / "config.json").unlink()  # as if the run had been killed before its save
        again = prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", output="run", executor=executor)
    assert again.resumed == N_LAYERS
    ref = prune(make_tiny_model(len(char_tokenizer)), ids, "wanda", output=tmp_path / "ref")
    assert _strip([r.to_json() for r in run.records]) == _strip([r.to_json() for r in ref.records])
    assert torch.equal(_logits(load_pruned(driver / "run"), ids), _logits(load_pruned(tmp_path / "ref"), ids))
