"""Is a model file the one that was written? Sizes and hashes, cheap enough to check at every load.

A full SHA-256 costs about a second per GB: fine for ``verify``, not for loading a 94 GiB table each
time a server starts. So every file we write gets a fingerprint of two parts, checked at load:

- its size: catches truncation, a partial copy, a file replaced by another of a different size;
- a *sampled* SHA-256: the whole file up to 64 MiB; above that, 64 blocks of 1 MiB at fixed,
  evenly spaced offsets (the first and last included). It catches any change to a file of up to
  64 MiB (every tiny and most quantized models), and, in larger files, a replaced or reordered file,
  a header or tail rewritten, or a corrupt region larger than the gaps between blocks.

What only the full hash catches: a few flipped bytes between the sampled blocks of a file larger than
64 MiB. ``check="full"`` (``EngramRuntime(check_hashes="full")``) hashes every byte of every file we
wrote, up to 16 GiB. A checkpoint's table shards, linked beside a model, not written by us, record no
full hash whatever their size (export and compile cost the same whatever the table size) and are
checked by size and sampled hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engram_export.errors import EngramError

__all__ = ["fingerprint", "check_fingerprint", "sha256", "CHECKS"]

WHOLE_LIMIT = 64 << 20
BLOCK, BLOCKS = 1 << 20, 64
FULL_HASH_LIMIT = 16 << 30  # larger files (a checkpoint's table shards) get no full hash at write time
CHECKS = ("size", "sampled", "full")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


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


def fingerprint(path: Path, full: bool = True) -> dict:
    """``{"size", "sampled_sha256"}`` and, with ``full``, ``"sha256"`` of every byte for files up to
    ``FULL_HASH_LIMIT`` (hashing a 100 GB table shard would take minutes at every export)."""
    entry = {"size": path.stat().st_size, "sampled_sha256": sampled_sha256(path)}
    if full and entry["size"] <= FULL_HASH_LIMIT:
        entry["sha256"] = sha256(path)
    return entry


def check_fingerprint(path: Path, entry: dict, check: str, where: str) -> None:
    """Refuse ``path`` unless it matches ``entry`` to the depth ``check`` (one of ``CHECKS``)."""
    if not path.is_file():
        raise EngramError(f"{where} lists {path.name}, which is missing from {path.parent}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise EngramError(f"{path} has {size} bytes, {where} says {entry['size']} (truncated, changed or replaced)")
    if check == "full" and "sha256" not in entry:  # a file too large to hash at write time
        check = "sampled"
    if check == "sampled" and sampled_sha256(path) != entry["sampled_sha256"]:
        raise EngramError(f"{path} does not match its sampled SHA-256 in {where} (changed or corrupt)")
    if check == "full":
        if sha256(path) != entry["sha256"]:
            raise EngramError(f"{path} does not match its SHA-256 in {where} (changed or corrupt)")
