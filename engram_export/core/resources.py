"""Refuse, before any work, what this machine cannot hold: memory for tensors, disk for files.

A refusal names what needed the room and both numbers, instead of a MemoryError, an OOM kill or a
full disk minutes later.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import psutil

from engram_export.core.errors import EngramError

__all__ = ["require_memory", "require_disk", "tensor_bytes", "file_system_type", "parse_size", "available_memory"]


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(size: str | int, what: str, whole: int | None = None) -> int:
    """Bytes of ``size``: an int, ``"8GiB"``, ``"512MiB"``, ``"1000000"``, or, where ``whole`` is given,
    a percentage of it (``"5%"``). Refuses anything else, and sizes below 0."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)", str(size).strip())
        unit = match.group(2) if match else ""
        if match is None or (unit != "%" and unit.lower() not in _UNITS) or (unit == "%" and whole is None):
            forms = "a size (8GiB, 512MiB, bytes)" + (" or a percentage (5%)" if whole is not None else "")
            raise EngramError(f"{what} must be {forms}, got {size!r}")
        number = float(match.group(1))
        value = int(number / 100 * whole) if unit == "%" and whole is not None else int(number * _UNITS[unit.lower()])
    if value < 0:
        raise EngramError(f"{what} must not be negative, got {size!r}")
    return value


def tensor_bytes(tensors: Iterable) -> int:
    """Bytes the tensors hold (or would: meta tensors count too)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def available_memory() -> int:
    """Bytes of memory available now without swapping (psutil's estimate, evictable page cache included)."""
    return psutil.virtual_memory().available


def require_memory(nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` more than the memory available now (psutil's estimate, page cache included)."""
    available = available_memory()
    if nbytes > available:
        raise EngramError(f"{what} would need {_size(nbytes)} of memory, {_size(available)} available")


MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")


def file_system_type(folder: str | Path) -> str:
    """The type of the file system mounted at or above ``folder`` ("ext4", "tmpfs", ...; "" if unknown)."""
    folder = str(Path(folder).resolve())
    best, kind = "", ""
    for partition in psutil.disk_partitions(all=True):
        mount = partition.mountpoint.rstrip("/") or "/"
        inside = folder == mount or folder.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, partition.fstype
    return kind


def require_disk(folder: str | Path, nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` more than the free space of the disk that holds (or will hold) ``folder``; on a
    file system held in memory (tmpfs, ramfs) more than the memory available too: filling one can bring
    the OOM killer, whatever its size limit says."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise EngramError(f"{what} would need {_size(nbytes)} of disk in {folder}, {_size(free)} free")
    kind = file_system_type(folder)
    if kind in MEMORY_FILE_SYSTEMS:
        require_memory(nbytes, f"{what} in {folder} (a {kind}: its files are held in memory)")
