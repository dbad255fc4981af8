"""The C heap under large tensors that change size from call to call (glibc, Linux).

glibc serves an allocation above its mmap threshold with its own mapping, returned to the system when freed, and
everything smaller from its heap.  The threshold starts at 128 KiB and rises to the size of every mapped block
that is freed, up to 32 MiB, so after a few frees tensors of several MiB come from the heap too.  A pruning run
allocates such tensors in sizes that change from call to call (the tokens routed to each expert, the steps of a
block's reconstruction), and the heap they leave is fragmented: freed space that no later request fits is never
returned, and resident memory grows to about twice what the process holds.

A fixed threshold of 1 MiB keeps every large tensor in its own mapping; alone it costs time (each mapping is
faulted in 4 KiB pages), and with transparent huge pages (``glibc.malloc.hugetlb=1``, 2 MiB pages) it costs
almost none.  glibc reads both settings from ``GLIBC_TUNABLES`` when a process starts, so the ``armor prune``
command starts itself again with them (:func:`armor.cli.console_main`); a program that prunes in its own process
can be started with the same variable (:data:`TUNABLES`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

__all__ = ["TUNABLES", "heap_tunables"]

#: The glibc tunables armor asks for: large allocations in their own mappings, backed by huge pages.
TUNABLES = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.hugetlb=1"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _is_glibc() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return hasattr(libc, "gnu_get_libc_version")  # musl and others have no such function


def _huge_pages_on_request() -> bool:
    """Whether the kernel gives transparent huge pages to a mapping that asks (``always`` or ``madvise``)."""
    try:
        mode = _THP.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def heap_tunables(environ: dict[str, str] | None = None) -> str | None:
    """The ``GLIBC_TUNABLES`` value to start a pruning process with, or None where it does not apply: not Linux
    with glibc, no transparent huge pages (the fixed threshold would cost time), or the user chose the heap's
    settings already (``GLIBC_TUNABLES`` or ``MALLOC_MMAP_THRESHOLD_`` set: theirs are kept)."""
    env = os.environ if environ is None else environ
    if "GLIBC_TUNABLES" in env or "MALLOC_MMAP_THRESHOLD_" in env or not sys.platform.startswith("linux"):
        return None
    if not _is_glibc() or not _huge_pages_on_request():
        return None
    return TUNABLES
