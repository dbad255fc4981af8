"""Peak resident memory of ``armor prune`` WITH evaluation and saving: streamed vs whole model.

    python benchmarks/memory.py --out /tmp/armor-mem [--method nowag] [--nsamples 16] [--eval-windows 20]
    python benchmarks/memory.py --out /tmp/armor-mem-moe --random-mixtral /tmp/mixtral-random [--heap glibc]

The model is SmolLM2-135M-Instruct, or with ``--random-mixtral DIR`` a mixture-of-experts Mixtral with random
weights (8 blocks of 8 experts, hidden 1024, experts 2048 wide, about 0.5B parameters in float32, SmolLM2's
tokenizer), written to DIR first if DIR has no model yet.

runs the same ``armor prune`` command twice, once as is (the model in memory) and once with ``--streaming`` (one
decoder block in memory for calibration, pruning, evaluation and saving), each in its own process under
``/usr/bin/time -v``, and prints a Markdown table of "Maximum resident set size", wall time and the perplexities
both runs printed (they must agree: the streamed run evaluates block by block).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


def _armor(heap: str) -> list[str]:
    """The command: the installed script (``armor prune`` restarts itself with ``armor.heap``'s settings), or with
    ``glibc`` the same entry point without the restart (glibc's defaults)."""
    if heap == "armor":
        return [str(Path(sys.executable).with_name("armor"))]
    return [sys.executable, "-c", "import sys; from armor.cli import main; sys.exit(main())"]


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    ppl = dict(re.findall(r"\[(\S+)\] perplexity on .*?: ([0-9.]+)", proc.stdout))
    return {"rss_mib": rss_kb / 1024, "wall": wall, "ppl": ppl}


def random_mixtral(folder: Path) -> Path:
    """A random-weight Mixtral saved as transformers saves it (per-expert matrices), with SmolLM2's tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers as tf

    from armor.data import default_model_path

    tokenizer = tf.AutoTokenizer.from_pretrained(default_model_path())
    config = tf.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="nowag")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--random-mixtral", type=Path, default=None, metavar="DIR")
    ap.add_argument("--heap", choices=("armor", "glibc"), default="armor",
                    help="armor: the installed script (its heap settings, armor.heap); glibc: glibc's defaults")
    args = ap.parse_args()
    env_note = f"OMP_NUM_THREADS={args.threads}"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    base = [
        *_armor(args.heap), "prune", "--method", args.method, "--compare", "none", "--nsamples", str(args.nsamples),
        "--seqlen", str(args.seqlen), "--eval-windows", str(args.eval_windows), "--quiet", "--no-resume",
        "--overwrite",
        *(["--model", str(random_mixtral(args.random_mixtral))] if args.random_mixtral else []),
    ]
    rows = []
    for mode, extra in (("whole model", []), ("streamed", ["--streaming"])):
        cmd = [*base, "--output", str(Path(args.out) / mode.replace(" ", "-")), *extra]
        got = measure(cmd)
        rows.append((mode, cmd, got))
        print(f"{mode}: {json.dumps(got)}", file=sys.stderr)
    print(f"Commands ({env_note}, heap {args.heap}, each under `/usr/bin/time -v`):\n")
    for _, cmd, _ in rows:
        print(f"    {shlex.join(['armor', *cmd[cmd.index('prune'):]])}")
    print("\n| run | peak RSS (MiB) | wall | dense ppl | pruned ppl |\n|---|---:|---:|---:|---:|")
    for mode, _, got in rows:
        print(f"| {mode} | {got['rss_mib']:.0f} | {got['wall']} | {got['ppl'].get('dense', '–')} | "
              f"{got['ppl'].get(args.method, '–')} |")


if __name__ == "__main__":
    main()
