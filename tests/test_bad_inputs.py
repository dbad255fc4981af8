"""Bad inputs found by probing (docs/guarantees.md): each gave a traceback, an error naming the wrong thing, or a
wrong model in silence before it was fixed; now each is a clear error naming the input, or a correct result."""

from __future__ import annotations

import pytest

import armor
from armor.cli import main
from conftest import TEXT, make_tiny_model


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


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
