"""One writer per output folder: an advisory lock that a killed run never leaves stuck.

:class:`FolderLock` holds an exclusive ``flock`` on ``<folder>/.armor-lock`` for as long as a run writes into the
folder.  The kernel drops a ``flock`` when its process dies (SIGKILL and power loss included), so a stale lock
file is harmless: the next run takes it.  A run that ends removes the file (and a run that locked a file just
removed takes the new one), so a finished folder holds no lock file.  A second run into the same folder fails at
once with an error naming the folder and the holder's process id (written into the file), instead of both
exiting 0 with one result lost.
On a platform without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderLock", "FolderBusyError"]

LOCK_NAME = ".armor-lock"


class FolderBusyError(RuntimeError):
    """Another live process is writing into the folder."""


class FolderLock:
    """``with FolderLock(folder):`` — exclusive for the block; :class:`FolderBusyError` when another process
    holds it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise FolderBusyError(
                    f"another armor run (process {holder}) is writing into {self.folder}; wait for it to finish or "
                    "choose another output folder"
                ) from None
            if self._still_linked(fd):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file (the folder is left as the run wrote it), then drop the lock."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
