"""Progress for long work (trace, table write, compile, calibration), printed to stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

__all__ = ["stage", "quiet"]

_QUIET = False


def quiet(value: bool = True) -> None:
    """Silence progress lines (tests, library use that prints its own)."""
    global _QUIET
    _QUIET = value


@contextlib.contextmanager
def stage(what: str) -> Iterator[dict]:
    """Print ``what ...`` now and ``what: done in N s`` at the end; yields a dict for extra notes."""
    notes: dict = {}
    if not _QUIET:
        print(f"[engram-export] {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield notes
    notes["seconds"] = time.perf_counter() - start
    if not _QUIET:
        extra = "".join(f", {k} {v}" for k, v in notes.items() if k != "seconds")
        print(f"[engram-export] {what}: done in {notes['seconds']:.1f} s{extra}", file=sys.stderr,
              flush=True)
