"""Progress of long work (trace, table write, compile, calibration), reported through ``logging``.

Each stage logs ``what ...`` when it starts and ``what: done in N s`` when it ends, at INFO level on the
``engram_export.progress`` logger: a library user sees them only if their logging shows INFO; the
command line shows them on stderr (``-q`` hides them).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

__all__ = ["stage", "quiet", "LOGGER"]

LOGGER = "engram_export.progress"
log = logging.getLogger(LOGGER)


def quiet(value: bool = True) -> None:
    """Silence progress (this package's own logger only)."""
    log.setLevel(logging.WARNING if value else logging.NOTSET)


@contextlib.contextmanager
def stage(what: str) -> Iterator[dict]:
    """Log ``what ...`` now and ``what: done in N s`` at the end; yields a dict for extra notes."""
    notes: dict = {}
    log.info("%s ...", what)
    start = time.perf_counter()
    yield notes
    notes["seconds"] = time.perf_counter() - start
    extra = "".join(f", {k} {v}" for k, v in notes.items() if k != "seconds")
    log.info("%s: done in %.1f s%s", what, notes["seconds"], extra)
