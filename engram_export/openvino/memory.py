"""Memory advice for table bytes: ``madvise`` on an array's pages, and copies backed by huge pages."""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os

import numpy as np

from engram_export.core import progress

__all__ = ["madvise", "populate", "huge_page_copy", "file_mappings", "FileMapping", "PAGE", "MADV_POPULATE_READ"]

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_POPULATE_READ = 14, 22


def madvise(array: np.ndarray, advice: int) -> bool:
    """``madvise`` on the pages under ``array``; False where the kernel refuses the advice."""
    start = array.ctypes.data // PAGE * PAGE
    length = array.ctypes.data + array.nbytes - start
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0


def populate(data: np.ndarray, name: str) -> np.ndarray:
    """Fault in every page of the mapping ``data`` now; returns it."""
    if data.nbytes and not madvise(data, MADV_POPULATE_READ):  # Linux < 5.14: touch one byte per page
        with progress.stage(f"reading {name} into memory ({data.nbytes / 2**30:.2f} GiB)"):
            int(data.reshape(-1).view(np.uint8)[::PAGE].sum())
    return data


def huge_page_copy(data: np.ndarray) -> np.ndarray:
    """The bytes of ``data`` copied into anonymous memory that the kernel backs with transparent huge
    pages where it can (the advice comes before the first touch); a flat uint8 view that keeps its
    buffer alive."""
    buffer = np.empty(data.nbytes + HUGE_PAGE, np.uint8)
    start = -buffer.ctypes.data % HUGE_PAGE
    copy = buffer[start : start + data.nbytes]
    if copy.nbytes:
        madvise(copy, MADV_HUGEPAGE)
    copy[:] = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return copy


@dataclasses.dataclass(frozen=True)
class FileMapping:
    """One line of ``/proc/self/maps`` that maps a file: [start, end) holds the file's bytes from ``offset``."""

    start: int
    end: int
    offset: int
    device: int
    inode: int
    path: str


def file_mappings() -> list[FileMapping]:
    """The file-backed mappings of this process, in address order (anonymous memory left out)."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or int(fields[4]) == 0:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            found.append(
                FileMapping(start, end, int(fields[2], 16), os.makedev(major, minor), int(fields[4]), fields[5].strip())
            )
    return found
