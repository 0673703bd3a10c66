"""Is a model file the one that was written? Sizes and hashes, checked at every load.

A full SHA-256 costs about a second per GB: right for every file up to about a GiB, too much for
hashing a 94 GiB table each time a server starts. Every file we write records a fingerprint of three
parts:

- its size: catches truncation, a partial copy, a file replaced by another of a different size;
- a *sampled* SHA-256: the whole file up to 64 MiB; above that, 64 blocks of 1 MiB at fixed,
  evenly spaced offsets (the first and last included): a replaced or reordered file, a header or tail
  rewritten, a corrupt region larger than the gaps between blocks;
- its full SHA-256 (files up to 16 GiB; a checkpoint's table shard when its SHA-256 is known without
  reading it: the name of its blob in a Hugging Face cache, which is the file's LFS object id).

How deep a load checks (``FileChecks``, one per load): ``"bounded"`` (the default) hashes every byte
of each file up to ``LOAD_FULL_LIMIT`` (1 GiB) that records a full hash, and larger files by size and
sampled hash, leaving them in ``deferred`` for a background pass (``runtime/verification.py``);
``"full"`` hashes every byte now; ``"sampled"`` and ``"size"`` check less. A file with no full hash (a
checkpoint shard linked from a plain folder) is checked by size and sampled hash at every level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from engram_export.core.errors import EngramError

__all__ = [
    "fingerprint",
    "check_fingerprint",
    "sha256",
    "lfs_sha256",
    "FileChecks",
    "file_checks",
    "check_level",
    "CHECKS",
    "LOAD_FULL_LIMIT",
]

WHOLE_LIMIT = 64 << 20
BLOCK, BLOCKS = 1 << 20, 64
FULL_HASH_LIMIT = 16 << 30  # larger files (a checkpoint's table shards) get no full hash at write time
LOAD_FULL_LIMIT = 1 << 30  # "bounded" checks hash files up to this size whole at load
CHECKS = ("size", "sampled", "bounded", "full")


def sha256(path: Path, on_chunk=None) -> str:
    """SHA-256 of every byte of ``path``; ``on_chunk(fd, offset, nbytes)`` after each 16 MiB read."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        offset = 0
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(f.fileno(), offset, len(chunk))
            offset += len(chunk)
    return digest.hexdigest()


def lfs_sha256(path: Path) -> str | None:
    """The SHA-256 of ``path`` known without reading it: a file of a Hugging Face cache snapshot is a
    link to ``blobs/<its LFS object id>``, which is the SHA-256 of its bytes (small files stored in git
    have a 40-digit SHA-1 name instead, and get None)."""
    if not Path(path).is_symlink():
        return None
    target = Path(path).resolve()
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the size and the sampled blocks (the whole file when it is small)."""
    size = path.stat().st_size
    if size <= WHOLE_LIMIT:
        return sha256(path)
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(BLOCKS):
            digest.update(os.pread(fd, BLOCK, (size - BLOCK) * i // (BLOCKS - 1)))
    finally:
        os.close(fd)
    return digest.hexdigest()


def fingerprint(path: Path, full: bool = True, known_sha256: str | None = None) -> dict:
    """``{"size", "sampled_sha256"}`` and ``"sha256"``: ``known_sha256`` when given (read from a source
    that vouches for it, such as ``lfs_sha256``), else, with ``full``, every byte hashed for files up to
    ``FULL_HASH_LIMIT`` (hashing a 100 GB table shard would take minutes at every export)."""
    entry: dict = {"size": path.stat().st_size, "sampled_sha256": sampled_sha256(path)}
    if known_sha256 is not None:
        entry["sha256"] = known_sha256
    elif full and entry["size"] <= FULL_HASH_LIMIT:
        entry["sha256"] = sha256(path)
    return entry


def check_fingerprint(path: Path, entry: dict, check: str, where: str) -> bool:
    """Refuse ``path`` unless it matches ``entry`` to the depth ``check`` (one of ``CHECKS``); True when
    every byte was hashed."""
    if not path.is_file():
        raise EngramError(f"{where} lists {path.name}, which is missing from {path.parent}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise EngramError(f"{path} has {size} bytes, {where} says {entry['size']} (truncated, changed or replaced)")
    if check == "bounded":
        check = "full" if size <= LOAD_FULL_LIMIT else "sampled"
    if check == "full" and "sha256" not in entry:  # a file too large to hash at write time
        check = "sampled"
    if check == "sampled" and sampled_sha256(path) != entry["sampled_sha256"]:
        raise EngramError(f"{path} does not match its sampled SHA-256 in {where} (changed or corrupt)")
    if check == "full" and sha256(path) != entry["sha256"]:
        raise EngramError(f"{path} does not match its SHA-256 in {where} (changed or corrupt)")
    return check == "full"


def check_level(check_hashes) -> str:
    """The level (one of ``CHECKS``) of a user's ``check_hashes``: True (``"bounded"``), False
    (``"size"``), a level name, or ``"background"`` (``"bounded"`` now, the rest by
    ``runtime/verification.py``)."""
    level = {True: "bounded", False: "size", "background": "bounded"}.get(check_hashes, check_hashes)
    if level not in CHECKS:
        raise EngramError(
            f"check_hashes must be True, False, 'background' or one of {', '.join(CHECKS)}, got {check_hashes!r}"
        )
    return level


def file_checks(check_hashes) -> FileChecks:
    """A new ``FileChecks`` of a user's ``check_hashes`` (``check_level``), or the ``FileChecks`` given."""
    if isinstance(check_hashes, FileChecks):
        return check_hashes
    return FileChecks(check_level(check_hashes))


@dataclasses.dataclass(frozen=True, eq=False)
class FileChecks:
    """What one load checks of the files it reads: made once by what starts the load (``EngramRuntime``
    from its options, ``calibrate``, a table shard) and passed down whole to every reader (the manifest,
    a model's files, its external data, its tables), which never changes its settings (frozen).

    ``level`` (one of ``CHECKS``): how deep a file is checked the first time the load reads it; a file
    read again by the same load (a layer's files, after the manifest that lists them) is checked by
    size only. ``tables_elsewhere``: the load's tables are served by other processes
    (``tables="ray://NAME"``), so a table file that is not here is no error (``table_elsewhere``; one
    that is here is checked as always). What the load left, for the background verification
    (``runtime/verification.py``): ``deferred``, (path, entry, where) of each file checked without
    hashing every byte."""

    level: str = "bounded"
    tables_elsewhere: bool = False
    deferred: list[tuple[Path, dict, str]] = dataclasses.field(default_factory=list, init=False, repr=False)
    _checked: set[Path] = dataclasses.field(default_factory=set, init=False, repr=False)  # absolute paths

    def __post_init__(self):
        if self.level not in CHECKS:
            raise EngramError(f"check level must be one of {', '.join(CHECKS)}, got {self.level!r}")

    def check(self, path: Path, entry: dict, where: str) -> None:
        """Refuse ``path`` unless it matches ``entry``: to ``level`` the first time this load reads it, by
        size after that."""
        key = Path(path).absolute()
        if key in self._checked:
            check_fingerprint(path, entry, "size", where)
            return
        hashed_whole = check_fingerprint(path, entry, self.level, where)
        self._checked.add(key)
        if not hashed_whole:
            self.deferred.append((path, entry, where))

    def table_elsewhere(self, path: Path) -> bool:
        """Whether the table file ``path`` is not here and need not be: the shards serve the tables."""
        return self.tables_elsewhere and not Path(path).exists()
