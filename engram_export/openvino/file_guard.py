"""A runtime's mapped files, guarded while it serves them (the extension's ``file_guard.cpp``).

A table is served from its file's pages (``table_memory="mmap"`` or ``"populate"``, and the model's
other constants always). Truncating that file under the runtime (an operator's ``cp`` over a live
file, an rsync in place) would kill the whole process with SIGBUS at the next read of a vanished page,
and writing it in place would let calls answer from other bytes. Guarded, a vanished page reads as
zeros and is recorded, a write is recorded, and the runtime refuses the call that saw it, and every
later one, in one line naming the file (``runtime/verification.py``). A new file renamed over the old
one is safe: the mapping keeps the old file alive and nothing is written to it.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import threading
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import TypeVar

from engram_export.core.errors import EngramError
from engram_export.openvino.extension import library_path
from engram_export.openvino.memory import FileMapping, file_mappings

__all__ = ["FileGuard", "guard_mappings", "guard_new_mappings", "constant_addresses"]

T = TypeVar("T")

_VANISHED, _WRITTEN = 1, 2  # the bits of a slot's state


@cache
def _library():
    library = ctypes.CDLL(str(library_path()), use_errno=True)  # the library OpenVINO loaded: one handler
    library.engram_guard_add.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p]
    library.engram_guard_add.restype = ctypes.c_int
    int_pointer = ctypes.POINTER(ctypes.c_int)
    library.engram_guard_changed.argtypes = [int_pointer, ctypes.c_size_t, int_pointer]
    library.engram_guard_changed.restype = ctypes.c_int
    library.engram_guard_remove.argtypes = [ctypes.c_int]
    return library


def constant_addresses(model) -> list[int]:
    """Where the bytes of each constant of an ``openvino.Model`` are (in its file's mapping, when read
    from one)."""
    return [
        op.get_tensor_view().data.ctypes.data
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and op.get_byte_size() > 0
    ]


def _mappings_under(addresses: Iterable[int]) -> list[FileMapping]:
    """The file mappings that hold any of ``addresses``, each once."""
    mappings = file_mappings()
    starts = [mapping.start for mapping in mappings]
    found: dict[int, FileMapping] = {}
    for address in addresses:
        index = bisect.bisect_right(starts, address) - 1
        if index >= 0 and address < mappings[index].end:
            found[mappings[index].start] = mappings[index]
    return list(found.values())


class _Slots:
    """Slots of the extension's guard, removed when this object goes, and only then what holds their
    mappings (``owner``, released with this object's attributes after ``__del__``): a range is never
    guarded once its memory may be unmapped and used again."""

    def __init__(self, owner):
        self.indices: list[int] = []
        self.owner = owner

    def __del__(self):
        for index in self.indices:
            _library().engram_guard_remove(index)


class FileGuard:
    """Guarded files, checked in one call: ``guard_mappings`` makes one per model, ``union`` one over a
    runtime's layers."""

    def __init__(self, slots: list[tuple[int, str]], keep: object):
        self._slots = slots  # (extension slot, file path)
        self._indices = (ctypes.c_int * len(slots))(*(index for index, _ in slots))
        self._keep = keep  # what keeps the slots registered

    @classmethod
    def union(cls, guards: Iterable[FileGuard | None]) -> FileGuard:
        """One guard over the files of every guard given (None: a backend that maps no file)."""
        present = [guard for guard in guards if guard is not None]
        return cls([slot for guard in present for slot in guard._slots], [guard._keep for guard in present])

    def slot_indices(self):
        """The extension's slots of the guarded files (a ctypes int array; the row reader checks them)."""
        return self._indices

    def changed(self) -> str | None:
        """One line naming a guarded file that was truncated or written since the guard began, or None
        (one call into the extension, which first takes in every write queued so far)."""
        if not self._slots:
            return None
        state = ctypes.c_int(0)
        found = _library().engram_guard_changed(self._indices, len(self._slots), ctypes.byref(state))
        if found < 0:
            return None
        if state.value & _VANISHED:
            what = "truncated (a page it read had vanished: the call saw zeros)"
        else:
            what = "changed in place (written or truncated)"
        return (
            f"{self._slots[found][1]} was {what} while this runtime served it: this runtime refuses every "
            f"call; load it again (deploy new files by renaming them over the old ones: docs/serving.md)"
        )


def _guard(mappings: list[FileMapping], owner) -> FileGuard:
    registered, slots = _Slots(owner), []
    for mapping in mappings:
        # a file renamed over or deleted since it was mapped: no path to watch, its pages still guarded
        path = mapping.path.removesuffix(" (deleted)")
        try:
            found = os.stat(path)
            same = (found.st_dev, found.st_ino) == (mapping.device, mapping.inode)
        except OSError:
            same = False
        index = _library().engram_guard_add(mapping.start, mapping.end - mapping.start, path.encode() if same else None)
        if index < 0:
            reason = os.strerror(ctypes.get_errno()) if index == -2 else "4096 mappings are guarded already"
            raise EngramError(f"cannot guard {path} against changes while it is served ({reason})")
        registered.indices.append(index)
        slots.append((index, path))
    return FileGuard(slots, registered)


def guard_mappings(addresses: Iterable[int], owner) -> FileGuard:
    """The file mappings under ``addresses``, guarded while the returned guard lives; it keeps ``owner``
    (what holds those mappings: the model whose constants they are) alive until they are unguarded."""
    return _guard(_mappings_under(addresses), owner)


_LOADING = threading.Lock()


def guard_new_mappings(paths: Iterable[Path], load: Callable[[], T]) -> tuple[T, FileGuard]:
    """``load()``'s result and a guard over the mappings of ``paths`` that it made: for a library that
    maps files of its own (ONNX Runtime maps external data), found by comparing the process's mappings
    before and after, one such load at a time. The guard keeps the result alive."""
    inodes = set()
    for path in paths:
        stat = os.stat(path)
        inodes.add((stat.st_dev, stat.st_ino))
    with _LOADING:
        before = {mapping.start for mapping in file_mappings() if (mapping.device, mapping.inode) in inodes}
        result = load()
        made = [m for m in file_mappings() if (m.device, m.inode) in inodes and m.start not in before]
    return result, _guard(made, result)
