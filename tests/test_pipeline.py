"""The whole model path on a tiny random Llama: calibrate, prune, save, load, export, evaluate, resume,
CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import armor
from armor.api import load as armor_load
from armor.model import (
    collect_stats,
    export_dense,
    find_decoder_layers,
    find_prunable_layers,
    load_pruned,
    method_options,
    name_matches,
    prune_pretrained,
)
from armor.model.calibration import calibration_sequences, read_documents, tokenize_documents
from armor.model.pipeline import StatsCache, calibration_ids
from armor.model.prune import layer_file
from conftest import TEXT, make_tiny_model

N_LAYERS = 14  # 2 blocks x (q, k, v, o, gate, up, down)

# Few iterations keep the ARMOR solvers fast; the baselines take no options.
FAST_OPTIONS = {
    "armor": method_options("armor", iterations=20, block_size=32, seed=0),
    "armor-fast": method_options("armor-fast", iterations=3, block_size=32, seed=0),
}


def _ids(tokenizer, nsamples=6, seqlen=48, seed=0):
    return calibration_ids(tokenizer, [TEXT * 12], nsamples, seqlen, seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


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


def test_generic_block_scan_without_known_path(tiny_model):
    """A model whose blocks are not at a known attribute path is still found (largest ModuleList of
    blocks)."""
    wrapper = torch.nn.Module()
    wrapper.inner = torch.nn.Module()
    wrapper.inner.stack = tiny_model.model.layers
    prefix, blocks = find_decoder_layers(wrapper)
    assert prefix == "inner.stack" and len(blocks) == 2


# ----------------------------------------------------------------------------------------------- calibration
def test_stats_match_direct_inputs_and_share(tiny_model, char_tokenizer):
    ids = _ids(char_tokenizer)
    layers = find_prunable_layers(tiny_model)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: captured[n].append(a[0].detach().clone()))
        for n, m in layers.items()
    ]
    _logits(tiny_model, ids)
    for h in hooks:
        h.remove()
    stats = collect_stats(tiny_model, layers, ids, batch_size=4, full=True, progress=False)
    for name, st in stats.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[name]]).float()
        assert st.n_tokens == x.shape[0] == ids.numel()
        torch.testing.assert_close(st.hessian_diag, 2 * x.square().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    # q/k/v (and gate/up) see the same tensor, so they share one statistics object.
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert stats["model.layers.0.mlp.gate_proj"] is stats["model.layers.0.mlp.up_proj"]
    unshared = collect_stats(tiny_model, layers, ids, batch_size=4, share_inputs=False, progress=False)
    assert unshared["model.layers.0.self_attn.k_proj"] is not unshared["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(
        unshared["model.layers.1.self_attn.k_proj"].hessian_diag,
        stats["model.layers.1.self_attn.k_proj"].hessian_diag,
    )


def test_calibration_errors(char_tokenizer, tmp_path):
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


# ----------------------------------------------------------------------------------- every method end to end
@pytest.mark.parametrize("method", armor.METHODS)
def test_prune_save_load_export_eval(method, tiny_model, char_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from armor.eval import perplexity

    ids = _ids(char_tokenizer)
    dense_ppl = perplexity(tiny_model, TEXT * 12, char_tokenizer, seqlen=48, max_windows=4).ppl
    out = tmp_path / method
    run = prune_pretrained(
        tiny_model, char_tokenizer, ids, method, FAST_OPTIONS.get(method), out_dir=out, progress=False
    )
    assert len(run.records) == N_LAYERS and run.resumed == 0
    for rec in run.records:
        assert 0 <= rec.loss <= 1.5 and rec.method == method
        if method in ("armor", "armor-fast", "nowag"):
            assert rec.loss <= rec.nowag_loss + 1e-6
    pruned_logits = _logits(tiny_model, ids)

    # save -> load gives the same outputs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["armor"]["method"] == method and len(cfg["armor"]["layers"]) == N_LAYERS
    assert len((out / "records.jsonl").read_text().splitlines()) == N_LAYERS
    loaded = armor_load(out)
    assert torch.equal(_logits(loaded, ids), pruned_logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # ties survive
    for name in find_prunable_layers(make_tiny_model(len(char_tokenizer))):
        w = loaded.get_submodule(name).dense_weight()
        assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2 or method in ("armor", "armor-fast")

    # dense export reloads with plain transformers and computes the same function
    dense_dir = export_dense(out, tmp_path / f"{method}-dense")
    hf = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    torch.testing.assert_close(_logits(hf, ids), pruned_logits, rtol=1e-4, atol=1e-4)
    assert "armor" not in json.loads((dense_dir / "config.json").read_text())

    ppl = perplexity(loaded, TEXT * 12, char_tokenizer, seqlen=48, max_windows=4)
    assert math.isfinite(ppl.ppl) and ppl.windows == 4 and ppl.ppl != dense_ppl


def test_untied_embeddings_and_dtype(char_tokenizer, tmp_path):
    model = make_tiny_model(len(char_tokenizer), tie=False)
    ids = _ids(char_tokenizer)
    prune_pretrained(model, char_tokenizer, ids, "wanda", out_dir=tmp_path / "m", progress=False)
    loaded = load_pruned(tmp_path / "m")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    half = load_pruned(tmp_path / "m", dtype="bfloat16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(half, ids).float()).all()


# ---------------------------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


def test_resume_after_kill_never_redoes_finished_layers(char_tokenizer, tmp_path, monkeypatch):
    import armor.model.prune as prune_mod

    calls: list[tuple[int, ...]] = []
    real = prune_mod.prune_layer

    def counting(weight, *a, **k):
        calls.append(tuple(weight.shape))
        return real(weight, *a, **k)

    monkeypatch.setattr(prune_mod, "prune_layer", counting)
    ids = _ids(char_tokenizer)
    out = tmp_path / "run"

    def die_after_two(name, rec):
        if len(calls) == 2:
            raise _Killed

    model = make_tiny_model(len(char_tokenizer))
    with pytest.raises(_Killed):
        prune_pretrained(model, char_tokenizer, ids, "nowag", out_dir=out, callback=die_after_two, progress=False)
    assert len(calls) == 2
    assert len(list((out / "layers").glob("*.safetensors"))) == 2
    assert not (out / "config.json").exists()  # never looks finished

    # A half-written temp file left by a kill is ignored; a damaged layer file is redone, not trusted.
    (out / "layers" / ".junk.safetensors.tmp").write_bytes(b"partial")
    calls.clear()
    cache = StatsCache(ids, progress=False)
    model = make_tiny_model(len(char_tokenizer))
    run = prune_pretrained(model, char_tokenizer, ids, "nowag", out_dir=out, stats_cache=cache, progress=False)
    assert len(calls) == N_LAYERS - 2 and run.resumed == 2
    assert cache.passes == 1
    ref = make_tiny_model(len(char_tokenizer))
    prune_pretrained(ref, char_tokenizer, ids, "nowag", progress=False)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))

    # everything done: no solver call and no calibration pass
    calls.clear()
    cache = StatsCache(ids, progress=False)
    run = prune_pretrained(
        make_tiny_model(len(char_tokenizer)),
        char_tokenizer,
        ids,
        "nowag",
        out_dir=out,
        stats_cache=cache,
        progress=False,
    )
    assert calls == [] and cache.passes == 0 and run.resumed == N_LAYERS

    # truncate one file: only that layer is redone
    victim = layer_file(out, "model.layers.1.mlp.up_proj")
    victim.write_bytes(victim.read_bytes()[:100])
    calls.clear()
    prune_pretrained(make_tiny_model(len(char_tokenizer)), char_tokenizer, ids, "nowag", out_dir=out, progress=False)
    assert len(calls) == 1

    # other settings (calibration data) never reuse the old files
    calls.clear()
    prune_pretrained(
        make_tiny_model(len(char_tokenizer)),
        char_tokenizer,
        _ids(char_tokenizer, seed=1),
        "nowag",
        out_dir=out,
        progress=False,
    )
    assert len(calls) == N_LAYERS

    # no resume: all redone
    calls.clear()
    prune_pretrained(
        make_tiny_model(len(char_tokenizer)),
        char_tokenizer,
        ids,
        "nowag",
        out_dir=out,
        resume=False,
        progress=False,
    )
    assert len(calls) == N_LAYERS


# ------------------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *argv):
    from armor.cli import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _small(model_dir, text, out, *extra):
    return [
        "prune",
        "--model",
        model_dir,
        "--calib-text",
        text,
        "--eval-text",
        text,
        "--nsamples",
        4,
        "--seqlen",
        48,
        "--eval-seqlen",
        48,
        "--eval-windows",
        3,
        "--output",
        out,
        "--quiet",
        *extra,
    ]


def test_cli_prune_inspect_export_eval(capsys, tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = _cli(
        capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "wanda", "--compare", "nowag,magnitude")
    )
    assert rc == 0, err
    assert "| dense |" in stdout and "| wanda |" in stdout and "| nowag |" in stdout
    assert (out / "report.md").is_file() and (out / "loss_per_layer.png").is_file()
    assert not (out / "wanda" / "layers").exists()  # resume files removed once the model is saved
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["dense", "nowag", "magnitude", "wanda"]
    assert all(math.isfinite(r["ppl"]) for r in results)

    rc, stdout, _ = _cli(capsys, *_small(tiny_model_dir, tiny_text, out, "--method", "wanda", "--compare", "none"))
    assert rc == 0 and "already pruned" in stdout

    rc, stdout, _ = _cli(capsys, "inspect", out / "wanda", "--layers")
    assert rc == 0 and "method:        wanda" in stdout and "model.layers.1.mlp.down_proj" in stdout
    rc, stdout, _ = _cli(capsys, "export", out / "wanda", tmp_path / "dense")
    assert rc == 0 and (tmp_path / "dense" / "model.safetensors").is_file()
    rc, stdout, _ = _cli(capsys, "eval", out / "wanda", "--text", tiny_text, "--seqlen", 48, "--max-windows", 2)
    assert rc == 0 and "perplexity on" in stdout
    rc, stdout, _ = _cli(capsys, "eval", tmp_path / "dense", "--text", tiny_text, "--seqlen", 48, "--max-windows", 2)
    assert rc == 0 and "perplexity on" in stdout
    # model-level speed of the pruned folder against the dense export
    bench = ["bench", "--models", out / "wanda", tmp_path / "dense", "--prompt-tokens", 8, "--new-tokens", 3]
    rc, stdout, _ = _cli(capsys, *bench, "--repeats", 1, "--warmup", 0, "--threads", 1)
    assert rc == 0 and "| pruned |" in stdout and "| dense |" in stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "bogus"], "unknown method 'bogus'"),
        (["--compare", "nowag,bogus2"], "unknown method 'bogus2'"),
        (["--seqlen", "100000"], "seqlen 100000 is larger than the calibration text"),
        (["--eval-seqlen", "100000"], "larger than the evaluation text"),
        (["--nsamples", "0"], "--nsamples must be >= 1"),
        (["--layers", "no_such_layer"], "no prunable layers selected"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny_model_dir, tiny_text, tmp_path, extra, needle):
    rc, _, err = _cli(capsys, *_small(tiny_model_dir, tiny_text, tmp_path / "o", *extra))
    assert rc == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_errors_name_bad_paths(capsys, tiny_model_dir, tiny_text, tmp_path):
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


def test_load_rejects_plain_folder(tiny_model_dir):
    with pytest.raises(ValueError, match="not an armor-pruned model"):
        load_pruned(tiny_model_dir)
    with pytest.raises(FileNotFoundError):
        load_pruned(Path(tiny_model_dir) / "nope")


def test_embedded_text_names():
    from armor.data import TEXTS, default_text_path

    assert set(TEXTS) == {"britannica", "lee", "lee_background"}
    with pytest.raises(ValueError, match="unknown embedded text"):
        default_text_path("wikitext")
