"""Output files that appear whole or not at all: write into a hidden folder beside, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from engram_export.errors import EngramError

__all__ = ["staged_output", "check_input_file"]


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


def check_input_file(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    path = Path(path)
    if path.suffix not in suffixes:
        raise EngramError(f"{what}: {path} should end in {' or '.join(suffixes)}")
    if not path.is_file():
        raise EngramError(f"{what}: {path} does not exist")
    return path
