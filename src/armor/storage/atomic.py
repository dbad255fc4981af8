"""Writes that are never seen half-done: a temporary sibling, fsync, rename.

Every file armor writes that a later run trusts (layer files, model weights, configs, records) goes through
here, so a run killed at any instant leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "atomic_save_safetensors", "write_json_atomic", "write_text_atomic", "write_safetensors_streamed",
    "safetensors_digest",
]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform/filesystem; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


@contextmanager
def _writing(path: Path) -> Iterator[str]:
    """A temporary sibling of ``path`` to write, removed unless published; a failed write (a full disk, a
    read-only folder) is an ``OSError`` that names ``path``, whichever library raised it."""
    tmp = _temp_sibling(path)
    try:
        yield tmp
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc} while writing {path}", str(path)) from None
    except SafetensorError as exc:  # safetensors reports I/O errors as its own type
        err = errno.ENOSPC if "space" in str(exc).lower() else errno.EIO
        raise OSError(err, f"{exc} while writing {path}", str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _publish(tmp: str, path: Path) -> None:
    """fsync ``tmp``, give it ordinary permissions (mkstemp makes it private) and rename it to ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save_safetensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str]) -> None:
    """``safetensors`` save of ``tensors`` (moved to CPU, made contiguous) that is never seen half-written."""
    path = Path(path)
    with _writing(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        _publish(tmp, path)


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    with _writing(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
        _publish(tmp, path)


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """JSON (indented, non-JSON values as strings) written atomically."""
    write_text_atomic(json.dumps(obj, indent=2, default=str) + "\n", path)


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _tensor_table(header: Mapping[str, Any]) -> bytes:
    """A safetensors header's tensor entries (not its metadata) in one canonical form: what a file's digest covers
    besides the data bytes (names, dtypes, shapes and byte ranges)."""
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    return json.dumps(table, sort_keys=True, separators=(",", ":")).encode()


def _header(
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]], metadata: Mapping[str, str]
) -> dict[str, Any]:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, shape, dt, _ in entries:
        if dt not in _ST_DTYPES:
            raise TypeError(f"cannot store {key} of dtype {dt} in safetensors")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
        header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header


#: what a digest placeholder holds until the data is written (a SHA-256 in hex has 64 characters)
_UNSET_DIGEST = "0" * 64


def write_safetensors_streamed(
    path: str | Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]],
    metadata: Mapping[str, str],
    after_each: Callable[[int], None] | None = None,
    digest_key: str | None = None,
) -> str:
    """A safetensors file written one tensor at a time: ``entries`` are ``(key, shape, dtype, load)`` and
    ``load()`` is called only when that tensor's bytes are written, so at most one is in memory.

    The format is an 8-byte little-endian header length, a JSON header with every tensor's dtype, shape and byte
    range, then the raw bytes in that order.  ``after_each(nbytes)`` runs after each tensor (e.g. to hand freed
    memory back to the system).  Returns the file's SHA-256 (:func:`safetensors_digest`: its tensor table and data
    bytes, computed as they are written); ``digest_key`` also records it in the file's own metadata under that key.
    """
    path = Path(path)
    meta = {**metadata, digest_key: _UNSET_DIGEST} if digest_key else dict(metadata)
    header = _header(entries, meta)
    digest = hashlib.sha256(_tensor_table(header))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with _writing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dt, load in entries:
                t = load()
                if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                    raise ValueError(f"{key}: expected {tuple(shape)} {dt}, got {tuple(t.shape)} {t.dtype}")
                t = t.detach().to("cpu").contiguous()
                nbytes = t.numel() * t.element_size()
                if t.numel():  # through the buffer protocol: no second copy of a large tensor
                    data = t.reshape(-1).view(torch.uint8).numpy().data
                    digest.update(data)
                    f.write(data)
                    del data
                del t
                if after_each is not None:
                    after_each(nbytes)
            if digest_key:  # over the placeholder's characters, in place: the header keeps its length
                entry = json.dumps({digest_key: _UNSET_DIGEST}, separators=(",", ":"))[1:-1].encode()
                f.seek(8 + blob.index(entry) + len(entry) - len(_UNSET_DIGEST) - 1)
                f.write(digest.hexdigest().encode())
        _publish(tmp, path)
    return digest.hexdigest()


def safetensors_digest(path: str | Path, chunk: int = 16 << 20) -> str:
    """The SHA-256 :func:`write_safetensors_streamed` returns for the file at ``path`` (its tensor table and its
    data bytes, not its metadata), read ``chunk`` bytes at a time."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        digest = hashlib.sha256(_tensor_table(header))
        left = end
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                raise OSError(errno.EIO, f"{path} ends {left} bytes before its last tensor", str(path))
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()
