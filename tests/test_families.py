"""Every decoder family on tiny random configs: prune with every method through ``armor.prune``, save, load both
ways (``armor.load`` and ``AutoModelForCausalLM.from_pretrained``), same logits as the pruned model and its
dense reconstruction; mixture-of-experts weights are pruned per expert once unfused (else left dense with a clear
message), layers of odd widths are left dense with a warning."""

from __future__ import annotations

import copy
import gc
import json
import logging
import weakref
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from transformers import AutoModelForCausalLM

import armor
import armor.models.experts as experts_module
from armor.eval import perplexity
from armor.models import (
    LinearExperts,
    find_decoder_layers,
    find_prunable_layers,
    set_module,
    stacked_experts,
    unfuse_experts,
)
from armor.pipeline import InMemorySource
from armor.pipeline.evaluate import perplexity_blockwise
from armor.runtime import ArmorLinear, SparseLinear
from armor.storage import CheckpointError, ShardReader, conversion, pruned_modules, read_armor_config
from conftest import class_load_without_armor

VOCAB = 128
TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
COMMON = {
    **TOKENS, "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 64,
}
ATTN_MLP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")

# family -> (config, blocks path, linear layers of one block)
FAMILIES = {
    "llama": (lambda: tf.LlamaConfig(num_key_value_heads=2, **COMMON), "model.layers", ATTN_MLP),
    "mistral": (lambda: tf.MistralConfig(num_key_value_heads=2, **COMMON), "model.layers", ATTN_MLP),
    "qwen2": (lambda: tf.Qwen2Config(num_key_value_heads=2, **COMMON), "model.layers", ATTN_MLP),
    "qwen3": (lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **COMMON), "model.layers", ATTN_MLP),
    "gemma2": (lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=16, **COMMON), "model.layers", ATTN_MLP),
    "gemma3": (lambda: tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, **COMMON), "model.layers", ATTN_MLP),
    "phi3": (
        lambda: tf.Phi3Config(num_key_value_heads=2, **COMMON), "model.layers",
        ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    "olmo2": (lambda: tf.Olmo2Config(num_key_value_heads=2, **COMMON), "model.layers", ATTN_MLP),
    "gpt_neox": (
        lambda: tf.GPTNeoXConfig(**COMMON), "gpt_neox.layers",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "opt": (
        lambda: tf.OPTConfig(
            **TOKENS, vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=64,
        ),
        "model.decoder.layers",
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
}

# every method, with the fewest iterations that still exercise its code (block_size: the layers are tiny)
METHODS = {
    "magnitude": {},
    "wanda": {},
    "nowag": {},
    "sparsegpt": {},
    "armor-fast": {"block_size": 8, "sweeps": 2},
    "armor": {"block_size": 8, "iterations": 3},
}

CALIBRATION = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def build(config: tf.PretrainedConfig) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(CALIBRATION).logits


def dense_reconstruction(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every packed layer replaced by an ``nn.Linear`` holding its dense weight."""
    twin = copy.deepcopy(model)
    for name, mod in pruned_modules(twin).items():
        w = mod.dense_weight()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        set_module(twin, name, lin)
    return twin


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_discovery_finds_every_block_and_projection(family):
    make_config, blocks, per_block = FAMILIES[family]
    model = build(make_config())
    prefix, found = find_decoder_layers(model)
    assert prefix == blocks and len(found) == 2
    assert set(find_prunable_layers(model)) == {f"{blocks}.{i}.{sub}" for i in range(2) for sub in per_block}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_save_load_both_ways(family, method, tmp_path):
    make_config, _, per_block = FAMILIES[family]
    run = armor.prune(build(make_config()), CALIBRATION, method, options=METHODS[method], output=tmp_path / "out")
    assert len(run.records) == 2 * len(per_block)
    pruned = run.model
    kind = ArmorLinear if method.startswith("armor") else SparseLinear
    assert {type(m) for m in pruned_modules(pruned).values()} == {kind}
    ref = logits(pruned)
    assert torch.isfinite(ref).all()

    explicit = armor.load(tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for loaded in (explicit, hf):
        mods = pruned_modules(loaded)
        assert set(mods) == set(pruned_modules(pruned)) and {type(m) for m in mods.values()} == {kind}
        torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(dense_reconstruction(hf)), ref, rtol=1e-5, atol=1e-5)
    assert read_armor_config(tmp_path / "out")["method"] == method


MOE = {
    "mixtral": lambda: tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, **COMMON),
}
ATTENTION = {f"model.layers.{i}.{s}" for i in range(2) for s in ATTN_MLP[:4]}
EXPERTS = {f"model.layers.{i}.mlp.experts.{p}.{e}" for i in range(2) for p in ("gate_up_proj", "down_proj")
           for e in range(4)}


@pytest.mark.parametrize("family", list(MOE))
def test_stacked_experts_are_left_dense_with_a_message(family, tmp_path, caplog):
    """Layer discovery on a model whose experts are stacked 3-D parameters names what it skips and the fix; the
    driver applies the fix itself (one nn.Linear per expert matrix), so a pruning run prunes the experts too."""
    caplog.set_level(logging.WARNING, logger="armor.models.layers")
    model = build(MOE[family]())
    assert set(find_prunable_layers(model)) == ATTENTION
    messages = [r.getMessage() for r in caplog.records if r.name == "armor.models.layers"]
    assert messages, "no message about the skipped experts"
    msg = messages[0]
    assert "mixture-of-experts" in msg and "left dense" in msg and "not nn.Linear" in msg
    assert "model.layers.*.mlp.experts.gate_up_proj" in msg and "model.layers.*.mlp.experts.down_proj" in msg
    assert "unfuse_experts" in msg  # and how to prune them
    run = armor.prune(model, CALIBRATION, "wanda", output=tmp_path / "out")
    pruned = set(pruned_modules(run.model))
    assert ATTENTION < pruned and any(".experts.down_proj." in n for n in pruned)
    ref = logits(run.model)
    torch.testing.assert_close(logits(armor.load(tmp_path / "out")), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(MOE))
def test_unfused_experts_compute_the_same_and_see_only_their_routed_tokens(family):
    model = build(MOE[family]())
    ref = logits(model)
    assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LinearExperts) and len(experts.gate_up_proj) == 4
    seen: list[int] = []
    hooks = [lin.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
             for lin in experts.gate_up_proj]
    torch.testing.assert_close(logits(model), ref, rtol=1e-6, atol=1e-6)
    for h in hooks:
        h.remove()
    # each token goes to top-2 of 4 experts: every expert's layer saw a share of the tokens, 2 per token in all
    assert sum(seen) == 2 * CALIBRATION.numel() and max(seen) < CALIBRATION.numel()
    assert not [r for r in find_prunable_layers(model) if r not in ATTENTION | EXPERTS]


def _routing(experts: LinearExperts, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five tokens, their top-2 experts (never expert 3; index 4 is the "no expert" slot) and routing weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, experts.hidden_dim, generator=gen)
    index = torch.tensor([[0, 1], [2, 0], [1, 4], [1, 2], [0, 2]])
    return x, index, torch.rand(5, 2, generator=gen)


@pytest.mark.parametrize("family", list(MOE))
def test_every_expert_forward_equals_the_routed_forward_and_traces_in_one_graph(family):
    """The capture-safe forward (every expert on every token) gives the routed forward's output, ignores an
    unrouted expert's non-finite output, and traces without a graph break, where the routed forward cannot."""
    model = build(MOE[family]())
    unfuse_experts(model)
    experts = model.model.layers[0].mlp.experts
    x, index, weights = _routing(experts, 1)
    routed = experts.routed_forward(x, index, weights)
    assert routed[2].abs().sum() > 0 and torch.isfinite(routed).all()
    torch.testing.assert_close(experts.every_expert_forward(x, index, weights), routed, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        experts.gate_up_proj[3].weight.fill_(float("nan"))  # expert 3 is routed no token
    torch.testing.assert_close(experts.every_expert_forward(x, index, weights), routed, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    traced = torch.compile(experts.every_expert_forward, backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(x, index, weights), routed, rtol=1e-6, atol=1e-6)
    with pytest.raises((torch._dynamo.exc.Unsupported, GuardOnDataDependentSymNode)):  # the host read-back
        torch.compile(experts.routed_forward, backend="eager", fullgraph=True)(x, index, weights)


def test_experts_run_every_expert_while_a_cuda_graph_is_captured(monkeypatch):
    model = build(MOE["mixtral"]())
    unfuse_experts(model)
    experts = model.model.layers[0].mlp.experts
    x, index, weights = _routing(experts, 2)
    routed = experts(x, index, weights)  # not capturing (CPU): the routed forward
    torch.testing.assert_close(routed, experts.routed_forward(x, index, weights), rtol=0, atol=0)

    def no_read_back(*args):
        raise AssertionError("the routed forward ran during a capture")

    monkeypatch.setattr(experts_module, "_capturing", lambda hidden_states: True)
    monkeypatch.setattr(LinearExperts, "routed_forward", no_read_back)
    torch.testing.assert_close(experts(x, index, weights), routed, rtol=1e-6, atol=1e-6)


def test_an_experts_module_with_another_forward_is_refused():
    model = build(MOE["mixtral"]())
    experts = model.model.layers[0].mlp.experts
    original = experts.forward
    experts.forward = lambda *args: 2 * original(*args)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts .*differs"):
        unfuse_experts(model)
    with pytest.raises(ValueError, match="not a stacked mixture-of-experts module"):
        unfuse_experts(model, ["model.layers.0.self_attn"])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "armor-fast"])
@pytest.mark.parametrize("family", list(MOE))
def test_each_expert_pruned_as_its_own_layer_saved_and_loaded(family, method, tmp_path):
    model = build(MOE[family]())
    unfuse_experts(model)
    run = armor.prune(model, CALIBRATION, method, options=METHODS[method], output=tmp_path / "out")
    assert {r.name for r in run.records} == ATTENTION | EXPERTS
    assert read_armor_config(tmp_path / "out")["unfused_experts"] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    ref = logits(run.model)
    for loaded in (armor.load(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert set(pruned_modules(loaded)) == ATTENTION | EXPERTS
        assert isinstance(loaded.model.layers[1].mlp.experts, LinearExperts)
        torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    hf.save_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")), ref, rtol=0, atol=0)
    # the dense export has transformers' own stacked experts again, with the pruned experts multiplied out
    dense = AutoModelForCausalLM.from_pretrained(armor.export_dense(tmp_path / "out", tmp_path / "dense"))
    assert not pruned_modules(dense) and not isinstance(dense.model.layers[0].mlp.experts, LinearExperts)
    torch.testing.assert_close(logits(dense), ref, rtol=1e-5, atol=1e-5)


def test_layers_of_odd_width_stay_dense_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="armor.models.layers")
    config = tf.LlamaConfig(**{**COMMON, "intermediate_size": 130}, num_key_value_heads=2)
    run = armor.prune(build(config), CALIBRATION, "magnitude", output=tmp_path / "out")
    msg = " ".join(r.getMessage() for r in caplog.records if r.name == "armor.models.layers")
    assert "leaving 2 linear layer(s) dense" in msg and "model.layers.*.mlp.down_proj (64x130) in 2 blocks" in msg
    assert not any(name.endswith("down_proj") for name in pruned_modules(run.model))
    assert len(pruned_modules(run.model)) == 12
    ref = logits(run.model)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), ref, rtol=0, atol=0)


def test_nothing_prunable_says_why_and_writes_nothing(tmp_path: Path):
    config = tf.LlamaConfig(**{**COMMON, "hidden_size": 66, "num_attention_heads": 3, "intermediate_size": 130},
                            num_key_value_heads=3)
    model = build(config)
    with pytest.raises(ValueError, match=r"all 14 selected linear layers have in_features not divisible by 4") as err:
        armor.prune(model, CALIBRATION, "magnitude", output=tmp_path / "out")
    assert "model.layers.*.self_attn.q_proj (66x66) in 2 blocks" in str(err.value)
    assert "model.layers.*.mlp.down_proj (66x130) in 2 blocks" in str(err.value)
    assert not (tmp_path / "out" / "config.json").exists()
    assert not any(isinstance(m, (ArmorLinear, SparseLinear)) for m in model.modules())


def stored(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration


def same_folders(a: Path, b: Path) -> None:
    """Two pruned folders hold the same tensors under the same keys and the same layers."""
    ta, tb = stored(a), stored(b)
    assert set(ta) == set(tb)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    ca, cb = read_armor_config(a), read_armor_config(b)
    assert ca["layers"] == cb["layers"] and ca.get("unfused_experts") == cb.get("unfused_experts")


def in_memory_and_streamed(folder: Path, out: Path, monkeypatch, method: str = "wanda") -> None:
    armor.prune(AutoModelForCausalLM.from_pretrained(folder), CALIBRATION, method, options=METHODS[method],
                output=out / "mem")
    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the whole model was loaded"))
        armor.prune(folder, CALIBRATION, method, options=METHODS[method], output=out / "str")
    same_folders(out / "mem", out / "str")


# more mixture-of-experts families (transformers' stacked experts, each with its own router and extras)
MORE_MOE = {
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=64, **COMMON),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, **COMMON),
    "olmoe": lambda: tf.OlmoeConfig(num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, **COMMON),
    "hunyuan_v1_moe": lambda: tf.HunYuanMoEV1Config(num_key_value_heads=2, num_experts=4, moe_topk=2, head_dim=16,
                                                    **COMMON),
    "qwen3_next": lambda: tf.Qwen3NextConfig(layer_types=["linear_attention", "full_attention"],
                                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, head_dim=16, **COMMON),
}
CONFIGS = {**{family: make for family, (make, _, _) in FAMILIES.items()}, **MOE, **MORE_MOE}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_checkpoint_streams_to_the_folder_an_in_memory_run_writes(family, tmp_path, monkeypatch):
    """transformers 5 saves (and the hub holds) some checkpoints under other keys than the model's: Mixtral's and
    Qwen-MoE's experts as per-expert matrices (Mixtral's under block_sparse_moe), GPT-NeoX's head as embed_out.
    A streamed run reads each tensor where from_pretrained puts it, each expert from its own stored matrices, so
    its folder is the in-memory run's bit for bit.  Before, mixture-of-experts checkpoints were refused and
    GPT-NeoX's untied head was not found."""
    build(CONFIGS[family]()).save_pretrained(tmp_path / "dense")
    in_memory_and_streamed(tmp_path / "dense", tmp_path, monkeypatch)
    ref = logits(armor.load(tmp_path / "mem"))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "str")), ref, rtol=0, atol=0)
    section = read_armor_config(tmp_path / "str")
    if family in MOE or family in MORE_MOE:
        moe_blocks = (1,) if family == "deepseek_v3" else (0, 1)  # its first block is dense (first_k_dense_replace)
        assert section["unfused_experts"] == [f"model.layers.{i}.mlp.experts" for i in moe_blocks]
        assert {f"model.layers.{i}.mlp.experts.down_proj.3" for i in moe_blocks} <= set(section["layers"])


def test_a_router_that_is_a_plain_linear_stays_dense(tmp_path, caplog):
    """HunYuan-MoE routes with a plain nn.Linear (gate.wg: hidden -> experts) whose weight its gate reads directly.
    Before, it was pruned like any layer: the run exited 0, and every forward of the pruned model failed on
    "'SparseLinear' object has no attribute 'weight'"."""
    caplog.set_level(logging.INFO, logger="armor.models.layers")
    model = build(MORE_MOE["hunyuan_v1_moe"]())
    run = armor.prune(model, CALIBRATION, "wanda", output=tmp_path / "out")
    pruned = set(pruned_modules(run.model))
    assert not [name for name in pruned if name.endswith("gate.wg")]
    assert "model.layers.0.mlp.experts.gate_up_proj.0" in pruned and "model.layers.1.mlp.shared_mlp.up_proj" in pruned
    assert "leaving 2 mixture-of-experts router(s) dense" in caplog.text and "mlp.gate.wg (4x64)" in caplog.text
    ref = logits(run.model)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), ref, rtol=0, atol=0)


def test_a_moe_checkpoint_streams_with_armor_resumes_across_modes_and_evaluates_block_by_block(tmp_path, monkeypatch):
    dense = tmp_path / "dense"
    build(MOE["mixtral"]()).save_pretrained(dense)
    in_memory_and_streamed(dense, tmp_path, monkeypatch, "armor-fast")
    ref = logits(armor.load(tmp_path / "mem"))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "str")), ref, rtol=0, atol=0)
    # the streamed reads digest as the in-memory model does: a streamed run resumes every layer of a memory run
    kept = tmp_path / "kept"
    armor.prune(AutoModelForCausalLM.from_pretrained(dense), CALIBRATION, "wanda", output=kept, keep_layer_files=True)
    assert armor.prune(dense, CALIBRATION, "wanda", output=kept).resumed == len(ATTENTION | EXPERTS)
    tokens = torch.randint(3, VOCAB, (200,), generator=torch.Generator().manual_seed(1))
    for folder in (dense, tmp_path / "str"):
        whole = perplexity(AutoModelForCausalLM.from_pretrained(folder), tokens, seqlen=32, batch_size=2)
        blockwise = perplexity_blockwise(folder, tokens, seqlen=32, batch_size=2)
        assert blockwise.ppl == pytest.approx(whole.ppl, rel=1e-5) and blockwise.windows == whole.windows


def test_stored_stacked_experts_are_read_one_expert_row_at_a_time(tmp_path, monkeypatch):
    """A checkpoint that stores the stacked 3-D experts tensors under the model's own keys (not what
    save_pretrained writes, but what from_pretrained loads as they are): each expert's layer reads its row."""
    model = build(MOE["qwen3_moe"]())
    folder = tmp_path / "stacked"
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    rows: list[tuple[str, int]] = []
    whole: list[str] = []
    load, load_row = ShardReader.load, ShardReader.load_row

    def watched_load(self, keys, *args, **kwargs):
        whole.extend(keys := list(keys))
        return load(self, keys, *args, **kwargs)

    def watched_row(self, key, index, *args):
        rows.append((key, index))
        return load_row(self, key, index, *args)

    monkeypatch.setattr(ShardReader, "load", watched_load)
    monkeypatch.setattr(ShardReader, "load_row", watched_row)
    in_memory_and_streamed(folder, tmp_path, monkeypatch)
    assert not [k for k in whole if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert ("model.layers.1.mlp.experts.down_proj", 3) in rows
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 5}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj holds 4 .* 5 experts"):
        armor.prune(folder, CALIBRATION, "wanda", output=tmp_path / "five")


def test_a_moe_checkpoint_whose_experts_do_not_match_its_config_is_refused(tmp_path):
    build(MOE["mixtral"]()).save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "dense" / "config.json").write_text(json.dumps({**config, "num_local_experts": 5}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj merges 4 .* 5 experts"):
        armor.prune(tmp_path / "dense", CALIBRATION, "wanda", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_weight_conversion_a_streamed_run_cannot_replay_is_refused(tmp_path, monkeypatch):
    """Only renames and the experts' merge are replayed a tensor at a time; any other conversion transformers
    would apply to a model tensor stops a streamed run before anything is written, naming the tensor."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    build(MOE["qwen3_moe"]()).save_pretrained(tmp_path / "dense")
    odd = WeightConverter(["mlp.experts.*.down_proj.weight"], "mlp.experts.down_proj",
                          operations=[MergeModulelist(dim=0), Concatenate(dim=2)])
    monkeypatch.setattr(conversion, "_transforms", lambda model: ([], [odd]))
    with pytest.raises(ValueError, match=r"builds model\.layers\.0\.mlp\.experts\.down_proj from 4 .*--streaming"):
        armor.prune(tmp_path / "dense", CALIBRATION, "wanda", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", list(MOE))
def test_experts_only_folder_is_refused_by_the_architecture_class_without_armor(family, tmp_path):
    """Before: a folder whose only pruned layers were experts loaded through MixtralForCausalLM.from_pretrained in a
    process without armor with random experts (their stacked keys missing, with a report only); and armor.load's
    model saved by save_pretrained wrote per-expert keys renamed by transformers' weight conversions."""
    model = build(MOE[family]())
    unfuse_experts(model)
    run = armor.prune(model, CALIBRATION, "magnitude", output=tmp_path / "out", include=["*.experts.*"])
    assert set(pruned_modules(run.model)) == EXPERTS
    ref = logits(run.model)
    armor.load(tmp_path / "out").save_pretrained(tmp_path / "by_armor")
    AutoModelForCausalLM.from_pretrained(tmp_path / "out").save_pretrained(tmp_path / "by_hf")
    targets = [tmp_path / "out", tmp_path / "by_armor", tmp_path / "by_hf"]
    verdicts, reports = class_load_without_armor(type(model).__name__, *targets)
    assert all(verdicts[str(t)].startswith("REFUSED") for t in targets), verdicts
    assert "mlp.experts.gate_up_proj" in reports and "ckpt: torch.Size([0])" in reports
    for target in targets:
        for loaded in (armor.load(target), AutoModelForCausalLM.from_pretrained(target)):
            torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
    # the dense export from either door has the keys transformers writes for the architecture itself
    def keys(folder: Path) -> set[str]:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return set(f.keys())

    build(MOE[family]()).save_pretrained(tmp_path / "plain")
    assert keys(armor.export_dense(tmp_path / "out", tmp_path / "dense")) == keys(tmp_path / "plain")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert keys(armor.export_dense(hf, tmp_path / "dense2")) == keys(tmp_path / "plain")


@pytest.mark.parametrize(
    "family,router",
    [
        ("phimoe", "mlp.router"),  # PhimoeTopKRouter(nn.Linear).forward returns (routing weights, experts)
        ("llama4_text", "feed_forward.router"),  # Llama4Router(nn.Linear).forward returns (scores, logits)
    ],
)
def test_a_linear_subclass_with_its_own_forward_stays_dense_and_is_named(family, router, tmp_path, caplog):
    """Before: the router was selected as an nn.Linear and replaced by a packed layer returning one tensor; the run
    and the save succeeded, and every forward of the saved model failed ('too many values to unpack')."""
    config = {
        "phimoe": lambda: tf.PhimoeConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON),
        "llama4_text": lambda: tf.Llama4TextConfig(
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
            **COMMON,
        ),
    }[family]
    caplog.set_level(logging.WARNING, logger="armor.models.layers")
    model = build(config())
    routers = [n for n, m in model.named_modules() if n.endswith(router)]
    assert routers and all(isinstance(model.get_submodule(n), nn.Linear) for n in routers)
    assert not set(routers) & set(find_prunable_layers(model))
    message = next(r.getMessage() for r in caplog.records if "forward of its own" in r.getMessage())
    assert f"model.layers.*.{router}" in message and type(model.get_submodule(routers[0])).__name__ in message
    run = armor.prune(model, CALIBRATION, "wanda", output=tmp_path / "out")
    assert pruned_modules(run.model) and not set(routers) & set(pruned_modules(run.model))
    ref = logits(run.model)
    torch.testing.assert_close(logits(armor.load(tmp_path / "out")), ref, rtol=0, atol=0)


def test_a_run_in_memory_holds_one_copy_of_the_experts():
    """Before, the in-memory source kept the stacked experts modules (to put them back after a refused run) while
    the per-expert layers held copies: a second copy of every expert for the whole run."""
    model = build(MOE["mixtral"]())
    stacked = [weakref.ref(p) for name, p in model.named_parameters() if ".experts." in name]
    source = InMemorySource(model)
    gc.collect()
    assert len(stacked) == 4 and [ref for ref in stacked if ref() is not None] == []
    source.undo_unpruned()  # nothing pruned: the stacked modules come back, rebuilt with the same weights
    assert not any(isinstance(m, LinearExperts) for m in model.modules())
    torch.testing.assert_close(logits(model), logits(build(MOE["mixtral"]())), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(MOE))
def test_a_refused_run_leaves_the_callers_moe_model_as_it_was(family, tmp_path):
    """Before: armor.prune unfused the experts before checks that can still fail; after the error the caller's
    model held per-expert layers, and its save_pretrained wrote keys transformers does not read (random experts)."""
    model = build(MOE[family]())
    ref = logits(model)
    kinds = {n: type(m) for n, m in stacked_experts(model).items()}
    too_long = torch.randint(3, VOCAB, (2, 65), generator=torch.Generator().manual_seed(0))  # 64 positions
    for bad in (dict(include=["no_such_layer"]), dict(calibration=too_long)):
        with pytest.raises(ValueError):
            armor.prune(model, bad.pop("calibration", CALIBRATION), "wanda", output=tmp_path / "out", **bad)
        assert {n: type(m) for n, m in stacked_experts(model).items()} == kinds
        assert not any(isinstance(m, LinearExperts) for m in model.modules())
        torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), ref, rtol=0, atol=0)


def test_the_cli_selects_expert_layers_by_pattern(capsys, char_tokenizer, tiny_text, tmp_path):
    """Before: the CLI matched --layers against the stacked experts module (the library unfuses first), so
    --layers 'experts.*' was 'no linear layer matches include' although armor.prune selects those layers."""
    from conftest import run_cli

    folder = tmp_path / "moe"
    build(MOE["mixtral"]()).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    rc, _, err = run_cli(capsys, "prune", "--model", folder, "--calib-text", tiny_text, "--nsamples", 4, "--seqlen",
                         32, "--no-eval", "--no-reconstruct", "--compare", "none", "--method", "wanda", "--quiet",
                         "--layers", "experts.down_proj.*", "--output", tmp_path / "out")
    assert rc == 0, err
    layers = read_armor_config(tmp_path / "out" / "wanda")["layers"]
    assert set(layers) == {f"model.layers.{i}.mlp.experts.down_proj.{e}" for i in range(2) for e in range(4)}


def test_experts_the_router_sends_no_calibration_token_to(tmp_path):
    """16 experts, one per token, 8 calibration tokens: at least 8 experts per block see no token.  Before: every
    method stopped with 'layers never called during calibration', magnitude (which needs no statistics) too."""
    config = lambda: tf.MixtralConfig(num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=1, **COMMON)  # noqa: E731
    ids = CALIBRATION[:1, :8]
    run = armor.prune(build(config()), ids, "magnitude", output=tmp_path / "m", reconstruct=None)
    unrouted = {r.name for r in run.records if r.extra.get("no_calibration_tokens")}
    assert len(unrouted) >= 2 * 2 * 8 and all(".mlp.experts." in n for n in unrouted)  # 2 blocks x 2 matrices
    torch.testing.assert_close(logits(armor.load(tmp_path / "m")), logits(run.model), rtol=0, atol=0)
    model = build(config())
    with pytest.raises(RuntimeError, match=r"never called during calibration: model\.layers\.0\.mlp\.experts") as err:
        armor.prune(model, ids, "wanda", output=tmp_path / "w", reconstruct=None)
    assert "router that sent none of the calibration tokens" in str(err.value) and "magnitude" in str(err.value)
    assert not any(isinstance(m, LinearExperts) for m in model.modules())  # the caller's model as it was


def test_a_layer_no_wrapper_fits_the_budget_of_is_named(capsys, char_tokenizer, tiny_text, tmp_path):
    """Qwen2-MoE's shared_expert_gate is hidden -> 1: even the smallest wrappers (1x1 and 4x4 blocks) add about
    4x the dense values under the default budget.  Before: stored silently (4.5x its dense size on a real model)."""
    from conftest import run_cli

    folder = tmp_path / "qwen2moe"
    config = tf.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64, **COMMON)
    build(config).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    rc, _, err = run_cli(capsys, "prune", "--model", folder, "--calib-text", tiny_text, "--nsamples", 2, "--seqlen",
                         16, "--no-eval", "--no-reconstruct", "--compare", "none", "--method", "armor-fast", "-O",
                         "sweeps=1", "--quiet", "--output", tmp_path / "out")
    assert rc == 0, err
    warning = err.split("armor-fast: no wrapper blocks fit the budget of 6.25% on layers of shape ")[1]
    assert "1x64 (1x4 blocks, 401.6%)" in warning and "store more than the dense ones" in warning
    assert "64x64 (1x4 blocks, 7.8%)" in warning  # over the budget too, below dense: named all the same
