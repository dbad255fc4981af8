"""Peak memory and time of perplexity evaluation: full logits (the old path) vs chunked NLL (armor.eval.nll).

Every measurement runs in a fresh child process (Linux only: it reads /proc/self/status). "old" is the
implementation before this change (``perplexity`` at commit 19246dd, read with ``git show``), ``chunk_tokens=None``
today's full-logits path, ``chunk_tokens=1024`` the default chunked path.

    python benchmarks/eval_memory.py cli      # `armor eval` on SmolLM2: whole-process peak RSS and wall time
    python benchmarks/eval_memory.py smollm2  # perplexity() on SmolLM2: extra RSS of the evaluation itself
    python benchmarks/eval_memory.py vocab    # random Llama with a 32k and a 262k vocabulary

"extra" is the evaluation's own peak: the child loads the model and tokenises the text, resets the kernel's
high-water mark (``echo 5 > /proc/self/clear_refs``), runs the evaluation and reads ``VmHWM - VmRSS(before)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path


def _status(field: str) -> int:
    """``field`` of /proc/self/status in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")
    return int(match.group(1)) * 1024


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


#: The commit whose armor/eval/perplexity.py is the pre-chunking implementation ("before").
OLD_COMMIT = "19246dd"


def old_perplexity_fn():
    """``perplexity`` as it was at :data:`OLD_COMMIT` (full logits, float32 cross-entropy), read from git."""
    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:src/armor/eval/perplexity.py"], cwd=repo, capture_output=True, text=True,
        check=True,
    ).stdout
    source = source.replace(
        "from ..model.calibration import model_device, tokenize_documents",
        "from armor.models import model_device\nfrom armor.text import tokenize_documents",
    )
    module = types.ModuleType("armor_eval_perplexity_old")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{OLD_COMMIT}:perplexity.py", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module.perplexity


def child(spec: dict) -> dict:
    """One measurement (runs in its own process)."""
    import torch

    from armor.eval import get_protocol, perplexity, token_streams

    torch.manual_seed(0)
    if spec["model"] == "smollm2":
        from armor.data import default_model_path, default_text_path
        from armor.storage import load_model, load_tokenizer

        path = default_model_path()
        tokenizer = load_tokenizer(path)
        model = load_model(path)
        docs = [ln.strip() for ln in default_text_path("lee_background").read_text().splitlines() if ln.strip()]
        tokens = token_streams(docs, get_protocol("armor"), tokenizer)[0]  # as `armor eval` tokenises it
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=spec["vocab"], max_position_embeddings=4096, tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg).eval()
        tokens = torch.randint(0, spec["vocab"], (spec["seqlen"] * spec["windows"],))
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    if spec["chunk_tokens"] == "old":
        old = old_perplexity_fn()

        def perplexity(model, tokens, chunk_tokens, **kw):  # noqa: F811 - the old function, same call
            return old(model, tokens, **kw)

    run = dict(seqlen=spec["seqlen"], batch_size=spec["batch"], chunk_tokens=spec["chunk_tokens"])
    # One small warm-up evaluation first: the first forward's one-time costs (lazily loaded kernels, thread
    # pools, allocator arenas) are not evaluation memory.
    perplexity(model, tokens[: spec["seqlen"]], max_windows=1, **{**run, "batch_size": 1})
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    res = perplexity(model, tokens, max_windows=spec["windows"], **run)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    mb = 2**20
    return {**spec, "ppl": res.ppl, "seconds": seconds, "rss_before_mb": before / mb, "extra_mb": (peak - before) / mb}


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(extra: list[str]) -> dict:
    """`armor eval` as a user runs it: whole-process peak RSS (wait4) and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["armor", "eval", *extra, "--json", f"{tmp}/r.json"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        res = json.loads(Path(f"{tmp}/r.json").read_text())
    return {"command": " ".join(cmd[:-2]), "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall,
            "ppl": res["perplexity"]["ppl"], "eval_s": res["perplexity"]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=("cli", "smollm2", "vocab"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 262144])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    print(f"load average before: {_load_avg()}")
    if args.what == "cli":
        from armor.data import default_model_path

        base = [str(default_model_path()), "--eval-windows", str(args.windows), "--eval-batch-size", str(args.batch),
                "--eval-seqlen", str(args.seqlen)]
        for extra in (["--full-logits"], []):
            print(json.dumps(run_cli(base + extra)), flush=True)
    else:
        vocabs = [None] if args.what == "smollm2" else args.vocab
        for vocab in vocabs:
            for chunk in ("old", None, 1024) if args.what == "smollm2" else (None, 1024):
                spec = {"model": args.what if vocab is None else "llama", "vocab": vocab, "seqlen": args.seqlen,
                        "windows": args.windows, "batch": args.batch, "chunk_tokens": chunk}
                print(json.dumps(run_child(spec)), flush=True)
    print(f"load average after: {_load_avg()}")


if __name__ == "__main__":
    main()
