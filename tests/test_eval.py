"""Evaluation: bounded-memory NLL, perplexity protocols against plain re-implementations, local lm-eval tasks, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from armor import prune
from armor.eval import (
    PROTOCOLS,
    PerplexityProtocol,
    get_protocol,
    perplexity,
    perplexity_windows,
    plan_windows,
    sum_token_nll,
)
from armor.eval.local_tasks import (
    SHIPPED_TASKS,
    read_items,
    sentence_completion_items,
    task_config,
    write_items,
)
from armor.eval.nll import IGNORE_INDEX, LogitTransform, logit_transform
from armor.storage import pruned_modules
from armor.text import calibration_ids
from conftest import TEXT, make_tiny_model

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(
    not HAVE_LM_EVAL, reason="lm-eval is not installed (pip install 'armor-prune[eval]')"
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _family(name: str, vocab: int = 97) -> nn.Module:
    """Tiny random models of several families: soft-capping, logit scaling, tied and untied heads."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama-tied":
        return make_tiny_model(vocab, tie=True)
    if name == "llama-untied":
        return make_tiny_model(vocab, tie=False)
    if name == "gemma2":  # final_logit_softcapping = 30, tied
        cfg = tf.Gemma2Config(vocab_size=vocab, head_dim=8, final_logit_softcapping=3.0, **SMALL)
        return tf.Gemma2ForCausalLM(cfg).eval()
    if name == "gemma3":
        cfg = tf.Gemma3TextConfig(vocab_size=vocab, head_dim=8, final_logit_softcapping=2.0, **SMALL)
        return tf.Gemma3ForCausalLM(cfg).eval()
    if name == "cohere":  # logits * logit_scale
        cfg = tf.CohereConfig(vocab_size=vocab, logit_scale=0.5, **SMALL)
        return tf.CohereForCausalLM(cfg).eval()
    if name == "granite":  # logits / logits_scaling
        cfg = tf.GraniteConfig(vocab_size=vocab, logits_scaling=4.0, **SMALL)
        return tf.GraniteForCausalLM(cfg).eval()
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        return tf.GPT2LMHeadModel(cfg).eval()
    raise KeyError(name)


FAMILIES = ["llama-tied", "llama-untied", "gemma2", "gemma3", "cohere", "granite", "gpt2"]


@torch.no_grad()
def _full_nll(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    logits = model(input_ids=ids).logits.float()
    keep = labels != IGNORE_INDEX
    return float(F.cross_entropy(logits[keep], labels[keep], reduction="sum")), int(keep.sum())


def _batch(vocab: int, batch: int = 3, length: int = 21, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    labels[1, :5] = IGNORE_INDEX  # some rows score fewer positions
    labels[2, 10:] = IGNORE_INDEX
    return ids, labels


# ----------------------------------------------------------------------------------------- chunked NLL
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunks", [(1, 1000), (7, 13), (64, 97), (1000, 5)])
def test_chunked_nll_equals_full_logits(family: str, chunks: tuple[int, int]) -> None:
    model = _family(family)
    ids, labels = _batch(97)
    want, n_want = _full_nll(model, ids, labels)
    got, n_got = sum_token_nll(model, ids, labels, chunk_tokens=chunks[0], chunk_vocab=chunks[1])
    assert n_got == n_want
    assert got == pytest.approx(want, rel=1e-5)
    # the unchunked path of the same function is the reference
    assert sum_token_nll(model, ids, labels, chunk_tokens=None)[0] == pytest.approx(want, rel=1e-6)


def test_transform_read_from_config() -> None:
    assert logit_transform(_family("gemma2")).to_json() == {"softcap": 3.0, "scale": None}
    assert logit_transform(_family("cohere")).to_json() == {"softcap": None, "scale": 0.5}
    assert logit_transform(_family("granite")).to_json() == {"softcap": None, "scale": 0.25}
    assert logit_transform(_family("llama-tied")).to_json() == {"softcap": None, "scale": None}


def test_head_with_bias_and_custom_head_module() -> None:
    model = _family("llama-untied")
    model.lm_head = nn.Linear(64, 97, bias=True)
    nn.init.normal_(model.lm_head.bias)
    ids, labels = _batch(97)
    want = _full_nll(model, ids, labels)[0]
    assert sum_token_nll(model, ids, labels, chunk_tokens=5, chunk_vocab=10)[0] == pytest.approx(want, rel=1e-5)

    class ScaledHead(nn.Linear):  # not a plain nn.Linear: applied whole, chunked over positions only
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    head = ScaledHead(64, 97)
    head.load_state_dict(model.lm_head.state_dict())
    model.lm_head = head
    want = _full_nll(model, ids, labels)[0]
    assert sum_token_nll(model, ids, labels, chunk_tokens=5, chunk_vocab=10)[0] == pytest.approx(want, rel=1e-5)


def test_unknown_logit_transform_is_caught() -> None:
    model = _family("llama-tied")
    ids, labels = _batch(97)
    with pytest.raises(RuntimeError, match="chunk_tokens=None"):
        sum_token_nll(model, ids, labels, chunk_tokens=8, transform=LogitTransform(softcap=0.5))


def test_nll_bad_input() -> None:
    model = _family("llama-tied")
    ids, labels = _batch(97)
    with pytest.raises(ValueError, match="batch, tokens"):
        sum_token_nll(model, ids[0], labels[0])
    with pytest.raises(ValueError, match="chunk_tokens"):
        sum_token_nll(model, ids, labels, chunk_tokens=0)
    labels[0, 0] = 500
    with pytest.raises(ValueError, match="token ids must lie in"):
        sum_token_nll(model, ids, labels, chunk_tokens=4)


def test_model_state_and_hooks_restored() -> None:
    model = _family("llama-tied").train()
    ids, labels = _batch(97)
    perplexity(model, ids.reshape(-1), seqlen=16, chunk_tokens=4)
    assert model.training
    assert not model.lm_head._forward_pre_hooks
    assert model(input_ids=ids).logits.shape == (3, 21, 97)


# ----------------------------------------------------------------------------------------- protocols
def test_protocol_presets_and_json() -> None:
    assert set(PROTOCOLS) == {"armor", "lm-eval-rolling", "strided"}
    p = get_protocol("strided", seqlen=64)
    assert (p.seqlen, p.stride) == (64, 32)
    assert get_protocol("strided", seqlen=64, stride=16).stride == 16
    assert PerplexityProtocol.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert "windows of 64 every 32" in p.to_json()["description"]
    assert get_protocol("lm-eval-rolling").to_json()["scores_window_start"] is True
    with pytest.raises(ValueError, match="unknown perplexity protocol"):
        get_protocol("wikitext")
    with pytest.raises(ValueError, match="stride only applies"):
        get_protocol("armor", stride=4)
    with pytest.raises(ValueError, match="stride <= seqlen"):
        get_protocol("strided", seqlen=8, stride=9)
    with pytest.raises(ValueError, match="documents must be"):
        PerplexityProtocol("x", documents="mixed")


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 33, 100])
def test_rolling_and_strided_score_every_token_once(n: int) -> None:
    for proto in (get_protocol("lm-eval-rolling", seqlen=16), get_protocol("strided", seqlen=16, stride=5)):
        scored = [t for w in plan_windows(n, proto) for t in range(w.target_begin, w.target_end)]
        assert scored == list(range(1, n)), proto.name
        for w in plan_windows(n, proto):
            assert w.end - w.begin <= 16 and w.begin < w.target_begin <= w.target_end <= w.end + 1


@needs_lm_eval
@pytest.mark.parametrize("n", [1, 3, 16, 17, 40, 64])
def test_rolling_plan_is_lm_evals(n: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    doc = list(range(100, 100 + n))
    stream = [7, *doc]  # prefix token first
    want = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(token_list=doc, prefix_token=7, max_seq_len=16, context_len=1)
    ]
    got = []
    for w in plan_windows(len(stream), get_protocol("lm-eval-rolling", seqlen=16)):
        inputs, targets = stream[w.begin : w.end], stream[w.target_begin : w.target_end]
        got.append((inputs, targets))
    # lm-eval feeds (context + continuation)[-(max_length + 1):][:-1] and scores the continuation
    assert [((c + t)[-17:][:-1], t) for c, t in want] == got


@torch.no_grad()
def _reference_armor(model: nn.Module, tokens: torch.Tensor, seqlen: int) -> float:
    """The SparseGPT/Wanda scripts' loop: non-overlapping windows, mean NLL of positions 1.., exp."""
    nlls = []
    for i in range(tokens.numel() // seqlen):
        batch = tokens[i * seqlen : (i + 1) * seqlen][None]
        logits = model(batch).logits
        loss = F.cross_entropy(logits[0, :-1].float(), batch[0, 1:])
        nlls.append(loss.float() * seqlen)
    return math.exp(torch.stack(nlls).sum() / (len(nlls) * seqlen))


@torch.no_grad()
def _reference_lm_eval_rolling(model: nn.Module, docs: list[list[int]], prefix: int, max_length: int) -> float:
    """lm-eval's loglikelihood_rolling written out: rolling windows, score the continuation, sum per document."""
    total, count = 0.0, 0
    for tokens in docs:
        pred_len = max_length  # context_len = 1
        predicted = 0
        first = min(max_length, len(tokens))
        pairs = [([prefix] + tokens[: first - 1], tokens[:first])]
        predicted += first
        while predicted < len(tokens):
            n = min(len(tokens) - predicted, pred_len)
            end = predicted + n
            pairs.append((tokens[end - max_length - 1 : end - 1], tokens[end - n : end]))
            predicted += n
        for context, cont in pairs:
            context = context[: len(context) - (len(cont) - 1)]
            inp = torch.tensor((context + cont)[-(max_length + 1) :][:-1])[None]
            logprobs = F.log_softmax(model(inp).logits[0].float(), -1)[-len(cont) :]
            total -= float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())
            count += len(cont)
    return math.exp(total / count)


@torch.no_grad()
def _reference_strided(model: nn.Module, tokens: torch.Tensor, max_length: int, stride: int) -> float:
    """Hugging Face's "perplexity of fixed-length models" loop, each window's NLL summed over its scored tokens
    (the guide weights a window's mean loss by ``valid labels - 1``, one token short after the first window)."""
    encodings = tokens[None]
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        logits = model(input_ids).logits[0, :-1].float()
        shifted = target_ids[0, 1:]
        nll_sum += F.cross_entropy(logits, shifted, ignore_index=-100, reduction="sum").item()
        n_tokens += int((shifted != -100).sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_armor_protocol_matches_reference(chunk_tokens: int | None) -> None:
    model = _family("llama-tied")
    tokens = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(3))
    res = perplexity(model, tokens, seqlen=32, batch_size=2, chunk_tokens=chunk_tokens)
    assert res.ppl == pytest.approx(_reference_armor(model, tokens, 32), rel=1e-5)
    assert (res.windows, res.tokens) == (6, 6 * 31)
    assert res.to_json()["protocol"]["name"] == "armor"
    assert perplexity(model, tokens, seqlen=32, max_windows=2).tokens == 62


@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_lm_eval_rolling_protocol_matches_reference(chunk_tokens: int | None) -> None:
    model = _family("gemma2")
    gen = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 97, (n,), generator=gen) for n in (5, 16, 17, 50, 1)]
    res = perplexity(model, docs, seqlen=16, batch_size=3, protocol="lm-eval-rolling", chunk_tokens=chunk_tokens)
    bos = model.config.bos_token_id
    assert res.ppl == pytest.approx(_reference_lm_eval_rolling(model, [d.tolist() for d in docs], bos, 16), rel=1e-5)
    assert res.tokens == 5 + 16 + 17 + 50 + 1
    assert res.documents == 5


@pytest.mark.parametrize("chunk_tokens", [None, 6])
def test_strided_protocol_matches_reference(chunk_tokens: int | None) -> None:
    model = _family("cohere")
    tokens = torch.randint(0, 97, (101,), generator=torch.Generator().manual_seed(5))
    res = perplexity(model, tokens, seqlen=24, stride=10, batch_size=4, protocol="strided", chunk_tokens=chunk_tokens)
    assert res.ppl == pytest.approx(_reference_strided(model, tokens, 24, 10), rel=1e-5)
    assert res.tokens == 100
    assert res.protocol is not None and res.protocol.stride == 10


def test_text_protocols_tokenise_as_documented(char_tokenizer) -> None:
    model = make_tiny_model(len(char_tokenizer))
    docs = [TEXT[:150], TEXT[150:], "Short one."]
    # armor: joined with a blank line, no special tokens
    joined = torch.tensor(char_tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"])
    res = perplexity(model, docs, char_tokenizer, seqlen=40, chunk_tokens=16)
    assert res.ppl == pytest.approx(_reference_armor(model, joined, 40), rel=1e-5)
    # lm-eval rolling: per document; the char tokenizer has no BOS, so the prefix is its EOS (lm-eval's rule)
    per_doc = [char_tokenizer(d)["input_ids"] for d in docs]
    res = perplexity(model, docs, char_tokenizer, seqlen=64, protocol="lm-eval-rolling", chunk_tokens=16)
    want = _reference_lm_eval_rolling(model, per_doc, char_tokenizer.eos_token_id, 64)
    assert res.ppl == pytest.approx(want, rel=1e-5)
    # lm-eval's word perplexity and bits per byte: the same total NLL over these documents' 6 words, 36 bytes
    counted = ["alpha beta  gamma", "d\u00e9lta\nepsilon zeta"]
    res = perplexity(model, counted, char_tokenizer, seqlen=64, protocol="lm-eval-rolling", chunk_tokens=16)
    total = res.nll * res.tokens
    assert res.word_perplexity == pytest.approx(math.exp(total / 6), rel=1e-9)
    assert res.bits_per_byte == pytest.approx(total / 36 / math.log(2), rel=1e-9)
    # truncated runs do not claim word perplexity
    truncated = perplexity(model, docs, char_tokenizer, seqlen=64, protocol="lm-eval-rolling", max_windows=1)
    assert truncated.word_perplexity is None


def test_perplexity_bad_input(char_tokenizer) -> None:
    model = make_tiny_model(len(char_tokenizer))
    tokens = torch.arange(50) % 90
    with pytest.raises(ValueError, match="larger than the"):
        perplexity(model, tokens, seqlen=64)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, tokens, seqlen=8, max_windows=0)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        perplexity(model, "some text", seqlen=8)
    with pytest.raises(ValueError, match="is empty"):
        perplexity(model, ["  ", ""], char_tokenizer, seqlen=8)
    with pytest.raises(ValueError, match="documents='separate'"):
        perplexity(model, [tokens, tokens], seqlen=8)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        perplexity_windows(tokens, 1)


# ----------------------------------------------------------------------------------------- local tasks
def test_shipped_task_is_reproducible() -> None:
    from armor.data import default_text

    try:
        text = default_text("britannica")
    except RuntimeError as exc:  # no network and no cache
        pytest.skip(f"Britannica text not available: {exc}")
    jsonl = SHIPPED_TASKS["britannica_completion"].with_suffix(".jsonl")
    assert read_items(jsonl) == sentence_completion_items(text)


def test_sentence_completion_items_deterministic() -> None:
    para = " ".join(f"The first paragraph has this sentence which ends with {w} and a dot." for w in ("one", "two"))
    other = " ".join(f"Another paragraph says little about anything but {w} today and so on." for w in ("red", "tan"))
    text = f"{para}\n\n{other}\n\n{para.replace('first', 'second')}"
    items = sentence_completion_items(text, n_items=4, n_choices=3, seed=1)
    assert items == sentence_completion_items(text, n_items=4, n_choices=3, seed=1)
    assert items != sentence_completion_items(text, n_items=4, n_choices=3, seed=2)
    for it in items:
        assert len(it["choices"]) == 3 and len(set(it["choices"])) == 3
        sentence = it["context"] + " " + it["choices"][it["label"]]
        assert sentence in text and sentence.endswith(".")
        assert len(it["context"].split()) == len(sentence.split()) // 2
    with pytest.raises(ValueError, match="usable sentences"):
        sentence_completion_items(text, n_items=50)


def test_task_files_checked_and_resolved(tmp_path: Path) -> None:
    good = tmp_path / "mine.jsonl"
    write_items([{"context": "A b c.", "choices": ["x", "y"], "label": 1}], good)
    cfg = task_config(good)
    assert cfg["task"] == "mine" and cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(good.resolve())
    shipped = task_config("britannica_completion")
    assert Path(shipped["dataset_kwargs"]["data_files"]["test"]).is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n{"context": "a", "choices": ["x"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        task_config(bad)
    boolean = tmp_path / "boolean.jsonl"  # before: true was taken for the index 1
    boolean.write_text('{"context": "a", "choices": ["x", "y"], "label": true}\n')
    with pytest.raises(ValueError, match=r"boolean.jsonl:1: expected"):
        task_config(boolean)
    with pytest.raises(ValueError, match="not a task"):
        task_config(tmp_path / "x.txt")


@torch.no_grad()
def _reference_mc(model: nn.Module, tokenizer, items: list[dict]) -> tuple[float, float]:
    """acc / acc_norm of lm-eval's multiple_choice written out: sum log p(" " + choice | context)."""
    acc = acc_norm = 0
    for it in items:
        ctx = tokenizer(it["context"])["input_ids"]
        lls = []
        for choice in it["choices"]:
            cont = tokenizer(" " + choice)["input_ids"]
            ids = torch.tensor(ctx + cont)[None]
            logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)[-len(cont) :]
            lls.append(float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum()))
        acc += max(range(len(lls)), key=lls.__getitem__) == it["label"]
        norm = [ll / len(c) for ll, c in zip(lls, it["choices"], strict=True)]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == it["label"]
    return acc / len(items), acc_norm / len(items)


@needs_lm_eval
def test_lm_eval_end_to_end_on_local_tasks(char_tokenizer, tmp_path: Path) -> None:
    from armor.eval.lm_eval_adapter import run_lm_eval

    model = make_tiny_model(len(char_tokenizer))
    shipped = read_items(SHIPPED_TASKS["britannica_completion"].with_suffix(".jsonl"))[:3]
    mine = [
        {"context": "The cat sat on the", "choices": ["mat.", "sky above.", "idea"], "label": 0},
        {"context": "One, two,", "choices": ["three", "blue"], "label": 0},
    ]
    user = write_items(mine, tmp_path / "my_task.jsonl")
    out = run_lm_eval(
        model, ["britannica_completion", str(user)], char_tokenizer, batch_size=8, limit=3, max_length=1024
    )
    assert set(out) == {"britannica_completion", "my_task"}
    assert out["britannica_completion"]["samples"] == 3 and out["my_task"]["samples"] == 2
    for task, items in (("britannica_completion", shipped), ("my_task", mine)):
        acc, acc_norm = _reference_mc(model, char_tokenizer, items)
        assert out[task]["acc"] == pytest.approx(acc), task
        assert out[task]["acc_norm"] == pytest.approx(acc_norm), task


def test_pruned_model_evaluated_as_packed(char_tokenizer, tmp_path: Path) -> None:
    """Perplexity (chunked) and lm-eval run on the packed 2:4 modules: nothing is reconstructed densely."""
    model = make_tiny_model(len(char_tokenizer))
    prune(model, calibration_ids(char_tokenizer, [TEXT * 12], nsamples=4, seqlen=32), "nowag")
    packed = pruned_modules(model)
    assert packed
    tokens = torch.tensor(char_tokenizer(TEXT * 3)["input_ids"])
    chunked = perplexity(model, tokens, seqlen=64, chunk_tokens=9, chunk_vocab=20)
    assert chunked.ppl == pytest.approx(perplexity(model, tokens, seqlen=64, chunk_tokens=None).ppl, rel=1e-5)
    if not HAVE_LM_EVAL:
        pytest.skip("lm-eval is not installed")
    from armor.eval.lm_eval_adapter import run_lm_eval

    items = [{"context": "The quick brown fox", "choices": ["jumps.", "sleeps soundly.", "is blue"], "label": 0}]
    out = run_lm_eval(model, [str(write_items(items, tmp_path / "fox.jsonl"))], char_tokenizer, max_length=512)
    acc, acc_norm = _reference_mc(model, char_tokenizer, items)
    assert (out["fox"]["acc"], out["fox"]["acc_norm"]) == (acc, acc_norm)
    assert pruned_modules(model).keys() == packed.keys()


# ----------------------------------------------------------------------------------------- CLI
def test_cli_eval_records_protocol(tiny_model_dir: Path, tiny_text: Path, tmp_path: Path, char_tokenizer) -> None:
    from armor.cli import main  # here, not at the top: the other tests do not need the whole CLI to import

    out = tmp_path / "res.json"
    args = ["eval", str(tiny_model_dir), "--eval-text", str(tiny_text), "--eval-seqlen", "32", "--eval-windows", "3",
            "--protocol", "strided", "--stride", "8", "--chunk-tokens", "5", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["perplexity"]["protocol"]["name"] == "strided" and res["perplexity"]["protocol"]["stride"] == 8
    assert res["perplexity"]["windows"] == 3 and res["perplexity"]["chunk_tokens"] == 5
    model = make_tiny_model(len(char_tokenizer))
    want = perplexity(model, tiny_text.read_text(), char_tokenizer, seqlen=32, max_windows=3, protocol="strided",
                      stride=8, chunk_tokens=None)
    assert res["perplexity"]["ppl"] == pytest.approx(want.ppl, rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stride", "4"], "stride only applies"),
        (["--protocol", "strided", "--stride", "64"], "stride <= seqlen"),
        (["--eval-text", "/nonexistent.txt"], "text file not found"),
        (["--eval-seqlen", "0"], "--eval-seqlen must be > 0"),
        (["--no-ppl"], "nothing to evaluate"),
        (["--tasks", "/nonexistent.jsonl"], "task file not found"),
        (["--tasks-include", "/nonexistent"], "not a folder"),
    ],
)
def test_cli_eval_bad_input(tiny_model_dir: Path, capsys, extra: list[str], message: str) -> None:
    from armor.cli import main

    assert main(["eval", str(tiny_model_dir), "--eval-seqlen", "32", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# ----------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_chunked_equals_full_and_lm_eval(smollm2_path: Path) -> None:
    from armor.data import default_text_path
    from armor.eval.lm_eval_adapter import run_lm_eval
    from armor.storage import load_model, load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    model = load_model(smollm2_path)
    docs = default_text_path("lee_background").read_text().splitlines()[:40]
    full = perplexity(model, docs, tokenizer, seqlen=256, max_windows=4, chunk_tokens=None)
    chunked = perplexity(model, docs, tokenizer, seqlen=256, max_windows=4, chunk_tokens=100, chunk_vocab=7000)
    assert chunked.ppl == pytest.approx(full.ppl, rel=1e-5)
    assert 5 < full.ppl < 100  # a real model on news text, not a random one
    if not HAVE_LM_EVAL:
        pytest.skip("lm-eval is not installed")
    out = run_lm_eval(model, ["britannica_completion"], tokenizer, batch_size=8, limit=8)
    assert out["britannica_completion"]["samples"] == 8
    # the same accuracy computed here: the choice with the highest log-likelihood after the context
    items = read_items(SHIPPED_TASKS["britannica_completion"].with_suffix(".jsonl"))[:8]
    assert out["britannica_completion"]["acc"] == pytest.approx(_choice_accuracy(model, tokenizer, items))


def _choice_accuracy(model, tokenizer, items) -> float:
    """Share of multiple-choice items whose label is the choice of highest summed log-probability, each choice
    tokenised as lm-eval does (the context's ids, then the rest of the ids of context + " " + choice)."""
    right = 0
    for item in items:
        ctx = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(item["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return right / len(items)
