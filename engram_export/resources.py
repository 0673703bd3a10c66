"""Refuse, before any work, what this machine cannot hold: memory for tensors, disk for files.

A refusal names what needed the room and both numbers, instead of a MemoryError, an OOM kill or a
full disk minutes later.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from engram_export.errors import EngramError

__all__ = ["require_memory", "require_disk", "tensor_bytes"]


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def tensor_bytes(tensors: Iterable) -> int:
    """Bytes the tensors hold (or would: meta tensors count too)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def require_memory(nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` more than the memory available now (psutil's estimate, page cache included)."""
    import psutil

    available = psutil.virtual_memory().available
    if nbytes > available:
        raise EngramError(f"{what} would need {_size(nbytes)} of memory, {_size(available)} available")


def require_disk(folder: str | Path, nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` more than the free space of the disk that holds (or will hold) ``folder``."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise EngramError(f"{what} would need {_size(nbytes)} of disk in {folder}, {_size(free)} free")
