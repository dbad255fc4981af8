"""Block-wise reconstruction on a tiny random Llama: the held-out error never rises, masks and stored shapes stay,
in-memory and streamed runs agree bit for bit, a run killed mid-reconstruction resumes to the same folder, and the
settings are part of the fingerprint."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import armor
from armor.pipeline import ReconstructSettings, prune
from armor.pipeline import driver as driver_module
from armor.pipeline import jobs as jobs_module
from armor.pipeline.reconstruct import _TrainView
from armor.runtime import ArmorLinear, SparseLinear
from armor.runtime.packing import unpack_mask
from armor.sparsity import is_nm_mask
from armor.storage import load_pruned, pruned_modules
from conftest import TEXT, make_tiny_model

N_LAYERS = 14
ARMOR = {"sweeps": 2, "block_size": 16}
RECON = ReconstructSettings(steps=12, lr=1e-3, holdout=4, compute_dtype="float32")


def _ids(tokenizer, nsamples=12, seqlen=32, seed=0):
    return armor.calibration_ids(tokenizer, [TEXT * 12], nsamples, seqlen, seed)


def _layer_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((folder / "layers").glob("*.safetensors"))}


def _packed(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (ArmorLinear, SparseLinear))}


def test_train_view_reproduces_the_module_exactly():
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    res = armor.prune_layer(w, torch.rand(48) + 0.1, "armor-fast", sweeps=2, block_size=16)
    from armor.runtime import module_from_result

    mod = module_from_result(res, None, torch.float32)
    mod.a_blocks.data += 0.01 * torch.randn_like(mod.a_blocks)  # non-identity wrappers
    view = _TrainView(mod)
    torch.testing.assert_close(view.weight_hat().detach(), mod.dense_weight(), rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 48)
    torch.testing.assert_close(view(x).detach(), mod(x), rtol=1e-5, atol=1e-5)
    # every free tensor gets a gradient; the mask is not a parameter
    view(x).square().sum().backward()
    assert {n for n, p in view.named_parameters() if p.grad is not None} == {"values", "a_blocks", "b_blocks"}


def _plain_linear(view: _TrainView, x: torch.Tensor) -> torch.Tensor:
    """The view's forward as plain autograd keeps it (every intermediate saved): the reference."""
    return torch.nn.functional.linear(x, view.weight_hat().to(x.dtype), view.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, None])
def test_train_view_recomputes_its_weight_for_the_same_gradients(dtype, block):
    """The view's backward rebuilds W_hat instead of saving it: outputs and gradients (of x and of every free
    tensor) equal plain autograd's, in float32 and under bfloat16 autocast, and no tensor of the weight's size
    (W_hat, the wrapper products' intermediates, a column index) is kept from forward to backward."""
    from armor.bench.layers import random_nm_result
    from armor.runtime import module_from_result

    mod = module_from_result(random_nm_result(64, 96, block, seed=3), torch.tensor(0.1).expand(64).clone())
    view = _TrainView(mod)
    x = torch.randn(2, 5, 96, requires_grad=True)
    own = {p.data_ptr() for p in view.parameters()} | {x.data_ptr()}

    def keep(t: torch.Tensor, saved: list[int]) -> torch.Tensor:  # sizes of what is saved besides x and parameters
        saved.append(0 if t.data_ptr() in own else t.numel())
        return t

    runs = {}
    for label, fn in (("recomputed", view), ("plain", lambda t: _plain_linear(view, t))):
        saved: list[int] = []
        x.grad = None
        view.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(keep, saved=saved), lambda t: t):
                y = fn(x)  # what the forward keeps for the backward
            (y.float().sin() * torch.linspace(-1, 1, 64)).sum().backward()
        runs[label] = (y.detach(), x.grad, *(p.grad for p in view.parameters()), max(saved))
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    assert len(runs["recomputed"]) == (6 if block else 4)
    for got, want in zip(runs["recomputed"][:-1], runs["plain"][:-1], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
    assert runs["plain"][-1] >= 64 * 96 // 2  # plain autograd keeps weight-sized tensors (W_hat, a column index)
    assert runs["recomputed"][-1] < 64 * 96 // 8  # the view keeps only x and its parameters (and y, for sin)


@pytest.mark.parametrize(("method", "loss", "dtype", "schedule"), [
    ("armor-fast", "mse", "float32", "constant"), ("wanda", "token", "float32", "cosine"),
    ("armor-fast", "token", "bfloat16", "cosine"),
])
def test_held_out_error_falls_and_format_is_unchanged(method, loss, dtype, schedule, char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    opts = ARMOR if method == "armor-fast" else None
    prune(make_tiny_model(len(char_tokenizer)), ids, method, options=opts, output=tmp_path / "plain",
          batch_size=4)
    recon = dataclasses.replace(RECON, loss=loss, compute_dtype=dtype, schedule=schedule)
    tuned = prune(make_tiny_model(len(char_tokenizer)), ids, method, options=opts, output=tmp_path / "tuned",
                  batch_size=4, reconstruct=recon)
    blocks = tuned.run_info["reconstruction"]["blocks"]
    assert [b["block"] for b in blocks] == [0, 1]
    for b in blocks:  # kept blocks improved; this setting improves both on this model
        assert b["kept"] and b["error_after"] < b["error_before"]
    # the records carry the block's verdict and each layer's proxy loss after tuning
    assert all(r.extra["reconstruction"]["block"] in (0, 1) for r in tuned.records)
    assert all(r.extra["reconstruction"]["loss_after"] > 0 for r in tuned.records)
    # the stored format is the pruned one: same specs, same masks (2:4 on the saved folder), other values
    a, b = load_pruned(tmp_path / "plain"), load_pruned(tmp_path / "tuned")
    pa, pb = _packed(a), _packed(b)
    assert pa.keys() == pb.keys() and len(pa) == N_LAYERS
    changed = 0
    for name in pa:
        assert pa[name].spec() == pb[name].spec()
        assert torch.equal(pa[name].indices, pb[name].indices)
        mask = unpack_mask(pb[name].indices, pb[name].out_features, pb[name].in_features, 2, 4)
        assert is_nm_mask(mask, 2, 4)
        changed += not torch.equal(pa[name].values, pb[name].values)
    assert changed == N_LAYERS
    cfg = armor.storage.read_armor_config(tmp_path / "tuned")
    assert cfg["reconstruction"]["steps"] == RECON.steps and len(cfg["reconstruction"]["blocks"]) == 2


def test_a_block_that_would_get_worse_keeps_its_pruned_tensors(char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    plain = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", options=ARMOR, batch_size=4)
    wild = ReconstructSettings(steps=6, lr=0.9, holdout=4)  # a learning rate that wrecks every block
    tuned = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", options=ARMOR, batch_size=4,
                  reconstruct=wild)
    blocks = tuned.run_info["reconstruction"]["blocks"]
    assert all(not b["kept"] for b in blocks)
    assert all(not (b["error_after"] < b["error_before"]) for b in blocks)
    pa, pb = _packed(plain.model), _packed(tuned.model)
    for name in pa:
        for key in ("values", "a_blocks", "b_blocks"):
            assert torch.equal(getattr(pa[name], key), getattr(pb[name], key)), (name, key)
    assert all(r.extra["reconstruction"]["kept"] is False for r in tuned.records)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_memory_and_streamed_runs_are_bit_identical(mode, char_tokenizer, tiny_model_dir, tmp_path):
    ids = _ids(char_tokenizer)
    kw = dict(options=ARMOR, batch_size=4, reconstruct=RECON, keep_layer_files=True, mode=mode)
    prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", output=tmp_path / "mem", **kw)
    # a tiny activation budget spills every activation to disk
    prune(tiny_model_dir, ids, "armor-fast", output=tmp_path / "str", activation_budget=1, **kw)
    mem, streamed = _layer_tensors(tmp_path / "mem"), _layer_tensors(tmp_path / "str")
    assert mem.keys() == streamed.keys() and len(mem) == N_LAYERS
    for name in mem:
        for key in mem[name]:
            assert torch.equal(mem[name][key], streamed[name][key]), (name, key)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("source", ["memory", "streamed"])
def test_killed_during_reconstruction_resumes_to_the_same_folder(source, char_tokenizer, tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    ids = _ids(char_tokenizer)
    kw = dict(options=ARMOR, batch_size=4, reconstruct=RECON, keep_layer_files=True)

    def target():
        return make_tiny_model(len(char_tokenizer)) if source == "memory" else tiny_model_dir

    ref = prune(target(), ids, "armor-fast", output=tmp_path / "ref", **kw)
    real = driver_module.reconstruct_block
    seen: list[int] = []

    def die_in_block_one(*args, **kwargs):
        seen.append(args[2])
        if args[2] == 1:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(driver_module, "reconstruct_block", die_in_block_one)
    with pytest.raises(_Killed):
        prune(target(), ids, "armor-fast", output=tmp_path / "run", **kw)
    monkeypatch.setattr(driver_module, "reconstruct_block", real)

    solved: list[str] = []
    real_job = jobs_module.prune_layer
    monkeypatch.setattr(jobs_module, "prune_layer", lambda w, *a, **k: solved.append(w.shape) or real_job(w, *a, **k))
    recon_blocks: list[int] = []
    monkeypatch.setattr(driver_module, "reconstruct_block",
                        lambda *a, **k: recon_blocks.append(a[2]) or real(*a, **k))
    run = prune(target(), ids, "armor-fast", output=tmp_path / "run", **kw)
    # block 0 was finished (pruned and tuned): neither redone; block 1 was pruned: only tuned again
    assert solved == [] and recon_blocks == [1] and run.resumed == N_LAYERS
    got, want = _layer_tensors(tmp_path / "run"), _layer_tensors(tmp_path / "ref")
    assert got.keys() == want.keys()
    for name in want:
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)
    ids_eval = _ids(char_tokenizer, nsamples=2, seed=3)
    with torch.no_grad():
        a = load_pruned(tmp_path / "run")(input_ids=ids_eval).logits
        b = load_pruned(tmp_path / "ref")(input_ids=ids_eval).logits
    assert torch.equal(a, b)
    keys = ("block", "kept", "error_before", "error_after")
    assert [{k: b[k] for k in keys} for b in run.run_info["reconstruction"]["blocks"]] == [
        {k: b[k] for k in keys} for b in ref.run_info["reconstruction"]["blocks"]
    ]


def test_settings_change_the_fingerprint(char_tokenizer, tmp_path):
    ids = _ids(char_tokenizer)
    out = tmp_path / "run"
    kw = dict(options=ARMOR, batch_size=4, keep_layer_files=True)
    off = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", output=out, **kw)
    on = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", output=out, reconstruct=RECON, **kw)
    assert not on.already_done and on.run_info["fingerprint"] != off.run_info["fingerprint"]
    again = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", output=out, reconstruct=RECON, **kw)
    assert again.already_done
    # "auto" is recorded (and fingerprinted) as the dtype it chose on this device
    auto = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", batch_size=4, options=ARMOR,
                 reconstruct=dataclasses.replace(RECON, compute_dtype="auto"))
    assert auto.run_info["reconstruction"]["compute_dtype"] in ("float32", "bfloat16")
    # default steps: DEFAULT_PASSES passes over the calibration batches (12 sequences in batches of 4, 5: 3 batches),
    # recorded and fingerprinted as the number they came to, so the same number given explicitly is the same run
    for batch, want in ((4, 12), (5, 12), (6, 8)):
        run = prune(make_tiny_model(len(char_tokenizer)), ids, "nowag", batch_size=batch,
                    reconstruct=dataclasses.replace(RECON, steps=None))
        assert run.run_info["reconstruction"]["steps"] == want, batch
    base = dict(options=ARMOR, batch_size=4, keep_layer_files=True, output=tmp_path / "steps")
    default = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast",
                    reconstruct=dataclasses.replace(RECON, steps=None), **base)
    assert prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", reconstruct=RECON, **base).already_done
    assert default.run_info["fingerprint"] == on.run_info["fingerprint"]  # RECON.steps is 12 = 4 x 3 batches
    for other in (dataclasses.replace(RECON, steps=13), dataclasses.replace(RECON, lr=2e-3),
                  dataclasses.replace(RECON, holdout=8), dataclasses.replace(RECON, loss="token"),
                  dataclasses.replace(RECON, schedule="cosine"),
                  dataclasses.replace(RECON, compute_dtype="bfloat16")):
        run = prune(make_tiny_model(len(char_tokenizer)), ids, "armor-fast", output=out, reconstruct=other, **kw)
        assert not run.already_done and run.run_info["fingerprint"] != on.run_info["fingerprint"]


def test_bad_settings_are_refused(char_tokenizer):
    ids = _ids(char_tokenizer)
    model = make_tiny_model(len(char_tokenizer))
    for bad, word in ((ReconstructSettings(steps=0), "steps"), (ReconstructSettings(lr=-1.0), "learning rate"),
                      (ReconstructSettings(holdout=-2), "holdout"), (ReconstructSettings(loss="l1"), "loss"),
                      (ReconstructSettings(compute_dtype="int8"), "compute dtype"),
                      (ReconstructSettings(schedule="linear"), "schedule")):
        with pytest.raises(ValueError, match=word):
            prune(model, ids, "nowag", reconstruct=bad)
    with pytest.raises(ValueError, match="leaving none to train on"):
        prune(model, ids, "nowag", batch_size=4, reconstruct=ReconstructSettings(holdout=12))


def test_a_holdout_that_takes_every_whole_batch_is_refused_before_anything_runs(char_tokenizer, tmp_path):
    """10 sequences in batches of 4 (4 + 4 + 2): a holdout of 6 takes the last two batches, 7 takes all three.
    Before: the run checked only holdout < sequences, pruned block 0, then failed in its reconstruction."""
    from armor.pipeline.reconstruct import batch_rows, split_batches

    assert batch_rows(10, 4) == [4, 4, 2] and batch_rows(8, 4) == [4, 4] and batch_rows(3, 8) == [3]
    assert split_batches([4, 4, 2], 6) == ([0], [1, 2])
    assert split_batches([4, 4, 2], 2) == ([0, 1], [2])
    assert split_batches([4, 4, 2], 0) == ([0, 1, 2], [0, 1, 2])  # judged on the training batches
    with pytest.raises(ValueError, match="holding out 7 takes all of them"):
        split_batches([4, 4, 2], 7)
    ids = _ids(char_tokenizer, nsamples=10)
    model = make_tiny_model(len(char_tokenizer))
    with pytest.raises(ValueError, match="10 calibration sequences make 3 batch"):
        prune(model, ids, "nowag", batch_size=4, reconstruct=ReconstructSettings(holdout=7), output=tmp_path / "o")
    assert not (tmp_path / "o" / "layers").exists() and not pruned_modules(model)


def test_error_terms_against_brute_force():
    from armor.pipeline.reconstruct import _error_terms

    torch.manual_seed(0)
    t = torch.randn(2, 5, 8)
    t[0, 0] *= 100  # a massive-activation token: it dominates "mse"'s denominator but counts once in "token"
    y = t + 0.1 * torch.randn(2, 5, 8)
    num, den = _error_terms(y, t, "mse")
    assert float(num / den) == pytest.approx(float(((y - t) ** 2).sum()) / float((t**2).sum()), rel=1e-6)
    ratios = [float(((y[b, s] - t[b, s]) ** 2).sum() / (t[b, s] ** 2).sum()) for b in range(2) for s in range(5)]
    num, den = _error_terms(y, t, "token")
    assert float(num / den) == pytest.approx(sum(ratios) / len(ratios), rel=1e-6)
    assert float(num / den) > 10 * float(_error_terms(y, t, "mse")[0] / _error_terms(y, t, "mse")[1])


def test_the_summary_says_which_sequences_judged_the_blocks():
    """Before: --reconstruct-holdout 0 printed a "held-out" error that was measured on the training batches."""
    from armor.report import reconstruction_lines, reconstruction_summary

    blocks = [{"block": 0, "kept": True, "error_before": 0.5, "error_after": 0.25, "seconds": 2.0},
              {"block": 1, "kept": False, "error_before": 0.5, "error_after": 0.75, "seconds": 2.0}]
    held = {**ReconstructSettings().to_json(), "blocks": blocks}
    assert held["holdout"] == 8
    assert reconstruction_summary(held) == ("reconstruction: 1/2 blocks improved, mean held-out output error "
                                            "0.5000 -> 0.3750, 4 s")
    none = {**held, "holdout": 0}
    assert reconstruction_summary(none) == ("reconstruction: 1/2 blocks improved, mean training (nothing held out) "
                                            "output error 0.5000 -> 0.3750, 4 s")
    assert "on the training sequences (none is held out here)." in "\n".join(reconstruction_lines("m", none, []))
    assert "on the held-out calibration sequences." in "\n".join(reconstruction_lines("m", held, []))
