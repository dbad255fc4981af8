"""Pruned folders as Hugging Face models: ``AutoModelForCausalLM.from_pretrained`` through armor's registered
quantizer, next to ``armor.storage.load_pruned``, the dense reconstruction, save_pretrained, pipelines, lm-eval,
the legacy v1 format and damaged weight files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, pipeline

import armor
import armor.runtime.modules as runtime_modules
import armor.runtime.packing as runtime_packing
from armor.data import default_text_path
from armor.eval.perplexity import perplexity
from armor.models import find_prunable_layers, set_module
from armor.report import folder_footprint
from armor.runtime import ArmorLinear, SparseLinear, module_from_result
from armor.solvers import prune_layer
from armor.storage import (
    CheckpointError,
    export_dense,
    is_pruned_folder,
    load_pruned,
    load_tokenizer,
    pruned_modules,
    read_armor_config,
    save_pruned,
)
from armor.storage.guard import is_guard
from armor.storage.hf_quantizer import ArmorConfig
from armor.storage.verify import verify_pruned_folder
from armor.text import calibration_ids, read_documents
from conftest import class_load_without_armor, make_char_tokenizer, make_tiny_model

VOCAB = len(make_char_tokenizer())

RUN_INFO = {
    "method": "armor-fast",
    "options": {"sweeps": 2},
    "pattern": "2:4",
    "calibration": {"nsamples": 2, "seqlen": 16},
    "records": [{"name": "x", "loss": 0.5, "nowag_loss": 0.6}],
    "base_model": "tiny-llama",
}


def tiny_llama(seed: int = 0) -> nn.Module:
    return make_tiny_model(VOCAB, seed=seed)


def prune_by_hand(model: nn.Module, method: str) -> nn.Module:
    """Every decoder linear layer replaced by its packed pruned module (random positive Hessian diagonals)."""
    gen = torch.Generator().manual_seed(1)
    for name, lin in find_prunable_layers(model).items():
        w = lin.weight.detach()
        diag = torch.rand(w.shape[1], generator=gen) + 0.5
        options = {"block_size": 8, "sweeps": 2} if method == "armor-fast" else {}
        result = prune_layer(w, diag, method, **options)
        set_module(model, name, module_from_result(result, lin.bias, torch.float32))
    return model


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module", params=["armor-fast", "wanda"], ids=["armor", "2of4"])
def folder(request, tmp_path_factory) -> tuple[Path, torch.Tensor, str]:
    """A saved pruned folder (ARMOR or plain 2:4), the in-memory model's logits and the method."""
    model = prune_by_hand(tiny_llama(), request.param)
    out = tmp_path_factory.mktemp(request.param) / "pruned"
    save_pruned(model, out, tokenizer=make_char_tokenizer(), run_info={**RUN_INFO, "method": request.param})
    return out, logits(model), request.param


def expected_type(method: str) -> type:
    return ArmorLinear if method == "armor-fast" else SparseLinear


def test_folder_is_a_plain_hf_folder(folder):
    path, _, _ = folder
    cfg = json.loads((path / "config.json").read_text())
    assert (path / "model.safetensors").is_file()
    assert not (path / "armor.safetensors").exists()
    assert "sparsity_config" not in cfg and "armor" not in cfg
    quant = cfg["quantization_config"]
    assert quant["quant_method"] == "armor" and quant["format"] == "armor-model-v2"
    assert set(quant["layers"]) == set(find_prunable_layers(tiny_llama()))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        guard = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    name = "model.layers.0.self_attn.q_proj"
    assert {f"{name}.values", f"{name}.indices"} <= keys
    # no dense weight: the guard at its key is empty (see test_guard_adds_no_stored_bytes)
    assert guard.dtype == torch.uint8 and tuple(guard.shape) == (0,)
    assert "lm_head.weight" not in keys  # tied to the embeddings: stored once, as save_pretrained does


def test_from_pretrained_equals_load_pruned_and_dense(folder, tmp_path):
    path, ref, method = folder
    hf = AutoModelForCausalLM.from_pretrained(path)
    explicit = load_pruned(path)
    for model in (hf, explicit):
        mods = pruned_modules(model)
        assert len(mods) == len(find_prunable_layers(tiny_llama()))
        assert all(type(m) is expected_type(method) for m in mods.values())
    torch.testing.assert_close(logits(hf), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(explicit), ref, rtol=0, atol=0)
    dense_dir = export_dense(path, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert not pruned_modules(dense)
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    torch.testing.assert_close(logits(dense), ref, rtol=1e-5, atol=1e-5)


def test_from_pretrained_builds_no_dense_weight(folder, monkeypatch):
    path, ref, method = folder

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense weight was built while loading")

    # every way the runtime turns packed tensors into a dense matrix (where it defines them)
    patched = 0
    for module in (runtime_modules, runtime_packing):
        for fn in ("unpack_nm", "unpack_mask", "block_product"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, forbidden)
                patched += 1
    assert patched >= 2
    hf = AutoModelForCausalLM.from_pretrained(path)
    explicit = load_pruned(path)
    monkeypatch.undo()
    for model in (hf, explicit):
        mods = pruned_modules(model)
        assert all(getattr(m, "cache_nbytes", lambda: 0)() == 0 for m in mods.values())
        assert not any(p.requires_grad for m in mods.values() for p in m.parameters())
        # the pruned layers hold their packed tensors only: half the values of the dense weight
        for m in mods.values():
            assert m.values.numel() == m.out_features * m.in_features // 2
            assert not any(isinstance(x, nn.Linear) for x in m.modules())
    torch.testing.assert_close(logits(hf), ref, rtol=0, atol=0)


def test_save_pretrained_round_trip_keeps_logits_and_provenance(folder, tmp_path):
    path, ref, method = folder
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(logits(again), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_pruned(tmp_path / "resaved")), ref, rtol=0, atol=0)
    info = read_armor_config(tmp_path / "resaved")
    assert info["method"] == method and info["records"] == RUN_INFO["records"]
    # an armor.load-ed model re-saved by transformers, and by armor without run_info, also keeps both
    load_pruned(path).save_pretrained(tmp_path / "resaved2")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved2")), ref, rtol=0, atol=0)
    save_pruned(again, tmp_path / "resaved3")
    assert read_armor_config(tmp_path / "resaved3")["calibration"] == RUN_INFO["calibration"]
    torch.testing.assert_close(logits(load_pruned(tmp_path / "resaved3")), ref, rtol=0, atol=0)


def test_read_armor_config_has_the_cli_keys(folder):
    path, _, method = folder
    info = read_armor_config(path)
    for key in ("method", "options", "pattern", "calibration", "records", "layers", "layer_dtypes", "versions"):
        assert key in info, key
    assert info["method"] == method and info["base_model"] == "tiny-llama"
    assert info["format"] == "armor-model-v2" and info["weights"] == "model.safetensors"
    assert set(info["layer_dtypes"].values()) == {"float32"} and info["unfused_experts"] == []
    assert is_pruned_folder(path)
    assert load_pruned(path).armor_config == info


def test_generate_and_text_generation_pipeline(folder):
    path, _, _ = folder
    hf = AutoModelForCausalLM.from_pretrained(path)
    explicit = load_pruned(path)
    prompt = IDS[:1, :5]
    out_hf = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    out_explicit = explicit.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out_hf.shape[1] > prompt.shape[1]
    assert torch.equal(out_hf, out_explicit)
    gen = pipeline("text-generation", model=str(path), device="cpu")
    assert type(gen.model.model.layers[0].mlp.down_proj) is expected_type(folder[2])
    text = gen("The fox", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("The fox") and len(text) > len("The fox")


def test_from_pretrained_dtype_applies_to_packed_layers(folder):
    path, ref, _ = folder
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    mods = pruned_modules(hf)
    assert {m.dtype for m in mods.values()} == {torch.bfloat16}
    assert all(m.indices.dtype == torch.uint8 for m in mods.values())
    explicit = load_pruned(path, dtype=torch.bfloat16)
    torch.testing.assert_close(logits(hf), logits(explicit), rtol=0, atol=0)
    torch.testing.assert_close(logits(hf).float(), ref, rtol=0.1, atol=0.1)


def test_lm_eval_hf_model_loads_the_folder(folder):
    lm_eval_models = pytest.importorskip("lm_eval.models.huggingface", reason="lm_eval is not installed")
    from lm_eval.api.instance import Instance

    path, _, method = folder
    requests = [Instance("loglikelihood", {}, ("The quick", " brown fox"), 0)]
    by_path = lm_eval_models.HFLM(pretrained=str(path), device="cpu", batch_size=1)
    assert type(by_path.model.model.layers[1].self_attn.o_proj) is expected_type(method)
    by_model = lm_eval_models.HFLM(pretrained=load_pruned(path), tokenizer=str(path), device="cpu", batch_size=1)
    (ll_path, _), = by_path.loglikelihood(requests)
    (ll_model, _), = by_model.loglikelihood(requests)
    assert ll_path == pytest.approx(ll_model, abs=1e-5) and ll_path < 0


def test_v1_folder_still_loads_through_armor_load(folder, tmp_path):
    """A folder armor 0.1 wrote (armor.safetensors + an 'armor' config section) loads via armor.load."""
    path, ref, method = folder
    model = load_pruned(path)
    state = model.state_dict()
    state.pop("lm_head.weight")
    v1 = tmp_path / "v1"
    v1.mkdir()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(v1 / "armor.safetensors"),
        metadata={"format": "armor-model-v1", "aliases": json.dumps({"lm_head.weight": "model.embed_tokens.weight"})},
    )
    cfg = json.loads((path / "config.json").read_text())
    quant = cfg.pop("quantization_config")
    cfg["model_type"] = quant["base_model_type"]  # armor 0.1 kept the architecture's own type
    cfg["armor"] = {
        **quant["run"], "format": "armor-model-v1", "weights": "armor.safetensors", "layers": quant["layers"],
        "layer_dtypes": quant["layer_dtypes"], "versions": quant["versions"],
    }
    (v1 / "config.json").write_text(json.dumps(cfg))
    assert read_armor_config(v1)["method"] == method and is_pruned_folder(v1)
    torch.testing.assert_close(logits(load_pruned(v1)), ref, rtol=0, atol=0)
    # and the upgrade the docs name: load it, save it again -> a folder from_pretrained reads
    save_pruned(load_pruned(v1), tmp_path / "v2")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "v2")), ref, rtol=0, atol=0)


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "cut_in_data"])
def test_damaged_weights_give_a_clear_error_both_ways(folder, tmp_path, damage):
    path, _, _ = folder
    bad = copy_folder(path, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    else:
        weights.write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pruned(bad)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_weights_and_unknown_format_are_clear_errors(folder, tmp_path):
    path, _, _ = folder
    bad = copy_folder(path, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pruned(bad)
    # a newer format: upgrade armor; anything else in quantization_config (armor 0.1's format, which lived under
    # config.json's "armor" key; a typo) is a damaged config, never "upgrade armor"
    for fmt, needle in (("armor-model-v9", "'armor-model-v9', written by a newer armor.*upgrade armor"),
                        ("armor-model-v1", "format is 'armor-model-v1', which no armor writes there.*damaged"),
                        ("armor-modle-v2", "format is 'armor-modle-v2', which no armor writes there.*damaged")):
        edited = copy_folder(path, tmp_path / fmt)
        cfg = json.loads((edited / "config.json").read_text())
        cfg["quantization_config"]["format"] = fmt
        (edited / "config.json").write_text(json.dumps(cfg))
        for load in (load_pruned, AutoModelForCausalLM.from_pretrained, verify_pruned_folder):
            with pytest.raises(ValueError, match=needle):
                load(edited)


def test_layer_the_architecture_lacks_is_named(folder, tmp_path):
    path, _, _ = folder
    bad = copy_folder(path, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    layers = cfg["quantization_config"]["layers"]
    layers["model.layers.7.mlp.up_proj"] = layers["model.layers.0.mlp.up_proj"]
    (bad / "config.json").write_text(json.dumps(cfg))
    for load in (load_pruned, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"model\.layers\.7\.mlp\.up_proj"):
            load(bad)


def test_armor_config_cannot_prune_a_dense_model_at_load_time(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=ArmorConfig())


def test_plain_folder_is_not_an_armor_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    assert read_armor_config(tmp_path / "dense") is None
    with pytest.raises(ValueError, match="not an armor-pruned model"):
        load_pruned(tmp_path / "dense")
    with pytest.raises(ValueError, match="no pruned"):
        save_pruned(tiny_llama(), tmp_path / "out")


@pytest.mark.slow
def test_smollm2_from_pretrained_matches_armor_load(smollm2_path, tmp_path):
    """The real model: SmolLM2 pruned with armor-fast (streamed from its checkpoint, short settings), loaded with
    from_pretrained, has the perplexity armor.load gives (what ``armor eval`` computes), and greedy generation
    runs."""
    tok = load_tokenizer(smollm2_path)
    calib = calibration_ids(tok, read_documents(default_text_path("britannica")), nsamples=8, seqlen=256)
    armor.prune(
        str(smollm2_path), calib, "armor-fast", options={"block_size": 64, "sweeps": 1}, output=tmp_path / "smol",
        tokenizer=tok,
    )
    text = read_documents(default_text_path("lee"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    explicit = load_pruned(tmp_path / "smol")
    assert {type(m) for m in pruned_modules(hf).values()} == {ArmorLinear} and len(pruned_modules(hf)) == 210
    ppl_hf = perplexity(hf, text, tok, seqlen=512, max_windows=8)
    ppl_explicit = perplexity(explicit, text, tok, seqlen=512, max_windows=8)
    prompt = tok("The capital of France is", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=12, do_sample=False)
    completion = tok.decode(out[0], skip_special_tokens=True)
    print(f"\nperplexity (8 windows of 512 tokens, Lee corpus): from_pretrained {ppl_hf.ppl:.4f}, "
          f"armor.load {ppl_explicit.ppl:.4f}\ngreedy: {completion!r}")
    assert ppl_hf.ppl == pytest.approx(ppl_explicit.ppl, rel=1e-6)
    assert out.shape[1] > prompt.input_ids.shape[1]


def test_export_dense_of_a_from_pretrained_model_restores_it(folder, tmp_path):
    path, ref, method = folder
    hf = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    out = export_dense(hf, tmp_path / "dense")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "sparsity_config" not in cfg
    dense = AutoModelForCausalLM.from_pretrained(out)
    assert not pruned_modules(dense)
    torch.testing.assert_close(logits(dense), ref, rtol=1e-5, atol=1e-5)
    # the model passed in is left as it was: packed layers, quantizer and config section back in place
    assert {type(m) for m in pruned_modules(hf).values()} == {expected_type(method)}
    assert hf.hf_quantizer is not None and isinstance(hf.config.quantization_config, ArmorConfig)
    torch.testing.assert_close(logits(hf), ref, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["missing", "misshaped"])
def test_missing_or_misshaped_packed_tensor_is_an_error_both_ways(folder, tmp_path, damage):
    """Before: from_pretrained loaded a folder missing one packed tensor and gave all-NaN logits."""
    path, _, _ = folder
    bad = copy_folder(path, tmp_path / "bad")
    weights = bad / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    key = "model.layers.1.mlp.up_proj.values"
    if damage == "missing":
        del state[key]
    else:
        state[key] = state[key][:-1].clone()
    save_file(state, str(weights), metadata=meta)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.values"):
        load_pruned(bad)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.values"):
        AutoModelForCausalLM.from_pretrained(bad)


_WITHOUT_ARMOR = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as exc:
    assert "armor" not in sys.modules, "armor was imported"
    print("REFUSED:", str(exc).splitlines()[0])
    sys.exit(0)
print("LOADED")
sys.exit(1)
"""


def test_transformers_without_armor_refuses_a_pruned_folder(folder, tmp_path):
    """Before: a process that never imported armor loaded random weights for every pruned layer, with a warning."""
    import subprocess
    import sys

    path, ref, _ = folder
    resaved = tmp_path / "resaved"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(resaved)  # armor imported here: it round-trips
    for target in (path, resaved, _export_free_copy(path, tmp_path)):
        proc = subprocess.run([sys.executable, "-c", _WITHOUT_ARMOR, str(target)], capture_output=True, text=True)
        assert proc.returncode == 0 and "REFUSED" in proc.stdout and "`armor`" in proc.stdout, proc.stdout
    assert json.loads((resaved / "config.json").read_text())["model_type"] == "armor"
    assert json.loads((resaved / "config.json").read_text())["quantization_config"]["base_model_type"] == "llama"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(resaved)), ref, rtol=0, atol=0)


def _export_free_copy(path: Path, tmp_path: Path) -> Path:
    """The folder as armor.load + save_pruned writes it again."""
    out = tmp_path / "again"
    save_pruned(load_pruned(path), out)
    return out


def strip_guards(src: Path, dst: Path) -> Path:
    """A copy of the pruned folder ``src`` as armor wrote it before the guard tensors: without them."""
    out = copy_folder(src, dst)
    weights = out / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    kept = {k: v for k, v in state.items() if not is_guard(v)}
    assert len(kept) == len(state) - len(read_armor_config(src)["layers"])
    save_file(kept, str(weights), metadata=meta)
    return out


def test_architecture_class_without_armor_refuses_a_pruned_folder(folder, tmp_path):
    """Before: LlamaForCausalLM.from_pretrained(folder) in a process without armor never read model_type, printed a
    MISSING / UNEXPECTED report and returned random weights in every pruned layer."""
    path, ref, _ = folder
    by_hf, by_armor = tmp_path / "by_hf", tmp_path / "by_armor"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(by_hf)  # re-saved by transformers, either door
    load_pruned(path).save_pretrained(by_armor)
    targets = [path, by_hf, by_armor, _export_free_copy(path, tmp_path)]
    tiny_llama().save_pretrained(tmp_path / "dense")  # and a run streamed from a checkpoint (the streamed writer)
    streamed = armor.prune(str(tmp_path / "dense"), IDS, "magnitude", output=tmp_path / "streamed")
    old = strip_guards(path, tmp_path / "old")  # the folder without its guards: what the guards prevent
    verdicts, reports = class_load_without_armor("LlamaForCausalLM", *targets, tmp_path / "streamed", old)
    for target in [*targets, tmp_path / "streamed"]:
        assert verdicts[str(target)].startswith("REFUSED") and "ignore_mismatched_sizes" in verdicts[str(target)]
    # the load report names the guards (its layer indices collapsed: model.layers.{0, 1}.self_attn.q_proj.weight)
    assert "self_attn.q_proj.weight" in reports and "MISMATCH" in reports and "ckpt: torch.Size([0])" in reports
    assert verdicts[str(old)] == "LOADED"
    for target in targets:  # and each still loads both ways with armor, same logits
        torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target)), ref, rtol=0, atol=0)
        torch.testing.assert_close(logits(load_pruned(target)), ref, rtol=0, atol=0)
    assert streamed.model is None  # a streamed run: its folder came from save_pruned_streamed
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")), logits(load_pruned(tmp_path / "streamed")),
        rtol=0, atol=0,
    )


def test_guards_load_silently_and_are_written_again(folder, tmp_path):
    path, ref, _ = folder
    guards = {f"{name}.weight" for name in read_armor_config(path)["layers"]}
    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"], info
    for model in (hf, load_pruned(path)):
        state = model.state_dict()
        assert guards <= set(state) and all(is_guard(state[k]) for k in guards)
        for mod in pruned_modules(model).values():  # the modules themselves hold no weight
            assert not hasattr(mod, "weight") and "weight" not in mod.state_dict()
        model.load_state_dict(state, strict=True)  # reads its own state back
        torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    save_pruned(hf, tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert guards <= set(f.keys())
    # a layer's weight key holds its guard or nothing: anything else is an error naming it, both ways
    bad = copy_folder(path, tmp_path / "bad")
    state = load_file(str(bad / "model.safetensors"))
    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        meta = f.metadata()  # the same save: only the guard differs
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3)
    save_file(state, str(bad / "model.safetensors"), metadata=meta)
    for load in (load_pruned, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is \(3,\)"):
            load(bad)


def test_folders_written_before_the_guards_still_load(folder, tmp_path):
    path, ref, _ = folder
    old = strip_guards(path, tmp_path / "old")
    hf, info = AutoModelForCausalLM.from_pretrained(old, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    torch.testing.assert_close(logits(hf), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_pruned(old)), ref, rtol=0, atol=0)
    hf.save_pretrained(tmp_path / "upgraded")  # saved again, it gets its guards
    verdicts, _ = class_load_without_armor("LlamaForCausalLM", tmp_path / "upgraded")
    assert verdicts[str(tmp_path / "upgraded")].startswith("REFUSED")


def _header_and_data_bytes(weights: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the bytes of its tensor data (the rest, less the length field)."""
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), len(data) - 8 - size


def test_guard_adds_no_stored_bytes(folder, tmp_path):
    path, _, _ = folder
    old = strip_guards(path, tmp_path / "old")
    new_fp, old_fp = folder_footprint(path), folder_footprint(old)
    for key in ("linear_bytes", "dense_linear_bytes", "linear_bytes_ratio", "values_kept_ratio", "wrapper_overhead"):
        assert new_fp[key] == old_fp[key], key
    # the weights file grows by the guards' header entries only: as much tensor data as without them
    header, data_bytes = _header_and_data_bytes(path / "model.safetensors")
    assert data_bytes == _header_and_data_bytes(old / "model.safetensors")[1]
    guards = [v for k, v in header.items() if k.endswith(".weight") and v["dtype"] == "U8"]
    assert len(guards) == len(read_armor_config(path)["layers"])
    assert all(v["shape"] == [0] and v["data_offsets"][0] == v["data_offsets"][1] for v in guards)
    # and the loaded packed layers count the same bytes as the folder's packed tensors
    stored = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not is_guard(v)}
    mods = pruned_modules(load_pruned(path))
    packed = sum(v.numel() * v.element_size() for k, v in stored.items() if k.rpartition(".")[0] in mods)
    assert sum(m.stored_nbytes() for m in mods.values()) == packed == new_fp["linear_bytes"]


def test_a_freshly_pruned_model_saved_with_save_pretrained_is_a_pruned_folder(tmp_path):
    """``armor.prune`` returns the model with what a loaded pruned model carries, so ``save_pretrained`` (not only
    ``armor.save_pruned``) writes a pruned folder: armor loads it through both doors to the same logits, and
    transformers without armor refuses it by either entry (model_type, guards).  Before, it wrote a plain config
    and no guards, and ``AutoModelForCausalLM`` loaded random weights into every pruned layer even with armor."""
    run = armor.prune(tiny_llama(), IDS, "wanda")
    ref = logits(run.model)
    run.model.save_pretrained(tmp_path / "fresh")
    cfg = read_armor_config(tmp_path / "fresh")
    assert cfg is not None and set(cfg["layers"]) == set(pruned_modules(run.model))
    assert cfg["method"] == "wanda" and len(cfg["records"]) == len(cfg["layers"])  # the run provenance too
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fresh")), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_pruned(tmp_path / "fresh")), ref, rtol=0, atol=0)
    verdicts, _ = class_load_without_armor("LlamaForCausalLM", tmp_path / "fresh")
    assert verdicts[str(tmp_path / "fresh")].startswith("REFUSED")
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["model_type"] == "armor"  # Auto* refuse it


def test_a_pruned_model_pickles_and_stays_a_pruned_model(folder, tmp_path):
    """``torch.save(model)`` / ``pickle`` of a pruned model, loaded by either door or fresh from ``armor.prune``.
    Before: PicklingError "Can't pickle <class '...LlamaConfig'>: it's not the same object as ...LlamaConfig" (the
    marked config class, mark_armored, has its base class's name)."""
    import io

    path, ref, _ = folder
    fresh = armor.prune(tiny_llama(), IDS, "wanda").model
    for model in (load_pruned(path), AutoModelForCausalLM.from_pretrained(path), fresh):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)
        assert back.config.to_dict()["model_type"] == "armor"  # still saves as a pruned folder
    torch.testing.assert_close(logits(back), logits(fresh), rtol=0, atol=0)
    back.save_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "resaved")), logits(fresh), rtol=0, atol=0)
    assert type(back.config) is type(fresh.config)  # noqa: E721 - the one marked class per architecture


def test_a_sharded_save_loads_both_ways_and_the_commands_read_it(capsys, tmp_path):
    """``save_pretrained(max_shard_size=...)`` of a pruned model writes ``model-0000k-of-0000n.safetensors`` and an
    index. Before: ``from_pretrained`` loaded it, but ``armor.load``, ``armor eval``, ``armor export`` said "has no
    model.safetensors" and ``armor inspect`` "weights file not found"."""
    from armor.storage.verify import verify_pruned_folder
    from conftest import TEXT, run_cli

    model = prune_by_hand(make_tiny_model(VOCAB, tie=False), "armor-fast")
    ref = logits(model)
    save_pruned(model, tmp_path / "one", tokenizer=make_char_tokenizer(), run_info={**RUN_INFO, "records": []})
    sharded = tmp_path / "sharded"
    load_pruned(tmp_path / "one").save_pretrained(sharded, max_shard_size="20KB")
    make_char_tokenizer().save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and not (sharded / "model.safetensors").exists()
    torch.testing.assert_close(logits(load_pruned(sharded)), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(sharded)), ref, rtol=0, atol=0)
    assert set(verify_pruned_folder(sharded)["layers"]) == set(find_prunable_layers(tiny_llama()))
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4)
    outs = {}
    for folder in (tmp_path / "one", sharded):
        rc, outs[folder.name], err = run_cli(capsys, "eval", folder, "--eval-text", text, "--eval-seqlen", 16,
                                             "--eval-windows", 2)
        assert rc == 0, err
    assert outs["one"].split("[")[0] == outs["sharded"].split("[")[0]  # the same perplexity
    rc, _, err = run_cli(capsys, "export", sharded, tmp_path / "dense")
    assert rc == 0, err
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), ref)
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid safetensors index"):
        load_pruned(sharded)


def test_inspect_reads_a_resaved_folder_whose_head_is_tied(capsys, tmp_path):
    """``save_pretrained`` of a loaded pruned model stores a tied head once, at the embeddings, as transformers does.
    Before: ``armor inspect`` refused that folder ("model.safetensors does not provide: lm_head.weight") while both
    loaders loaded it."""
    from conftest import run_cli

    model = prune_by_hand(tiny_llama(), "armor-fast")  # its head is tied to the embeddings
    ref, path = logits(model), tmp_path / "pruned"
    save_pruned(model, path, tokenizer=make_char_tokenizer(), run_info={**RUN_INFO, "records": []})
    for door, load in (("armor", load_pruned), ("hf", AutoModelForCausalLM.from_pretrained)):
        load(path).save_pretrained(tmp_path / door)
        with safe_open(str(tmp_path / door / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # noqa: SIM118
        torch.testing.assert_close(logits(load_pruned(tmp_path / door)), ref, rtol=0, atol=0)
        rc, out, err = run_cli(capsys, "inspect", tmp_path / door)
        assert rc == 0 and "does not provide" not in err, err
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:  # without its embeddings: still refused
        save_file({k: f.get_tensor(k) for k in f.keys() if k != "model.embed_tokens.weight"},  # noqa: SIM118
                  str(tmp_path / "hf" / "model.safetensors"))
    rc, _, err = run_cli(capsys, "inspect", tmp_path / "hf")
    assert rc == 2 and "does not provide: model.embed_tokens.weight" in err


def test_generate_compiles_the_static_cache_decoding_of_a_pruned_folder(folder):
    # transformers compiles a static cache's decode step when the quantizer says the model is compileable (on CUDA
    # by default; _compile_all_devices asks for it here): one graph, the eager tokens
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    path, _, _ = folder
    hf = AutoModelForCausalLM.from_pretrained(path)
    prompt = IDS[:1, :5]
    ref = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    config = CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    try:
        out = hf.generate(
            prompt, max_new_tokens=6, do_sample=False, cache_implementation="static", compile_config=config
        )
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1
    assert torch.equal(out, ref)


def test_a_resave_after_a_dtype_change_records_the_dtype_it_stores(folder, tmp_path):
    """Before: a float32 folder loaded, cast with .to(torch.bfloat16) and saved kept layer_dtypes 'float32' in its
    config.json, so armor inspect and the footprint reported float32 bytes (1.9x what the folder stores)."""
    from armor.runtime import state_nbytes
    from armor.storage import mark_pruned

    path, _, _ = folder
    made = {
        "armor.load": lambda: load_pruned(path),
        "from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(path),
        "in memory": lambda: prune_by_hand(tiny_llama(), "wanda"),
    }
    for how, make in made.items():
        model = make().to(torch.bfloat16)
        if how == "in memory":
            mark_pruned(model, {"method": "wanda"})
        model.save_pretrained(tmp_path / how)
        section = read_armor_config(tmp_path / how)
        assert set(section["layer_dtypes"].values()) == {"bfloat16"}, how
        stored = sum(state_nbytes(m) for m in pruned_modules(load_pruned(tmp_path / how)).values())
        assert folder_footprint(tmp_path / how)["linear_bytes"] == stored, how
