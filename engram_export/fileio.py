"""File I/O with clear errors: checked inputs, and outputs that appear whole or not at all (written
into a hidden folder beside, then renamed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from engram_export.errors import EngramError

__all__ = ["staged_output", "staged_folder", "check_input_file", "check_output_file", "load_npz"]


def check_output_file(path: str | Path, suffix: str) -> Path:
    """Refuse an output path with the wrong suffix or in a missing folder, before any work."""
    path = Path(path)
    if path.suffix != suffix:
        raise EngramError(f"output {path} should end in {suffix}")
    if not path.parent.is_dir():
        raise EngramError(f"output folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def staged_output(path: str | Path) -> Iterator[Path]:
    """Yield a path to write ``path`` (and any side files: external data, .bin) into.

    The yielded path lies in a fresh hidden folder beside ``path``. When the block ends without an
    exception, every file in that folder is renamed into place, the main file last, so a reader never
    sees a main file whose side files are missing. On an exception nothing is left behind.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise EngramError(f"output folder {path.parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging / path.name
        for written in sorted(staging.iterdir(), key=lambda f: f.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``folder`` to fill; renamed to ``folder`` at the end (which
    must not exist or be empty), removed on an exception."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise EngramError(f"output folder {folder.parent} does not exist")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EngramError(f"output {folder} exists and is not an empty folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_input_file(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    path = Path(path)
    if path.suffix not in suffixes:
        raise EngramError(f"{what}: {path} should end in {' or '.join(suffixes)}")
    if not path.is_file():
        raise EngramError(f"{what}: {path} does not exist")
    return path


def load_npz(path: str | Path, names: tuple[str, ...]) -> dict:
    """The arrays ``names`` of an .npz file (no pickles), or an error naming what is wrong."""
    import zipfile

    import numpy as np

    path = check_input_file(path, (".npz",), "inputs")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in names if n not in data.files]
            if missing:
                raise EngramError(f"inputs: {path} has no {', '.join(missing)} "
                                  f"(found {', '.join(data.files) or 'nothing'})")
            return {n: data[n] for n in names}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise EngramError(f"inputs: {path} is not a readable .npz ({exc})") from None
