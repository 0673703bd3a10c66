"""Progress of long work (trace, table write, compile, calibration), reported through ``logging``.

Each stage logs ``what ...`` when it starts and ``what: done in N s`` when it ends, at INFO level on the
``engram_export.core.progress`` logger: a library user sees them only if their logging shows INFO; the
command line shows them on stderr (``-q`` hides them). Work with a known size (bytes written, bench
rounds) also logs how far it got, at most once a second, each record carrying ``progress=(done, total)``
for a handler to draw as a bar (the command line does, on a terminal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["stage", "steps", "bytes_written", "quiet", "TerminalHandler", "LOGGER"]

LOGGER = "engram_export.core.progress"
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


class _Steps:
    """Counts work done and logs it, at most once per ``every`` seconds (and at the end)."""

    def __init__(self, what: str, total: float, unit: str, every: float):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self._shown = 0.0, time.perf_counter()
        self._lock = threading.Lock()  # workers of one stage advance it from several threads

    def set(self, done: float, force: bool = False) -> None:
        self.done = done
        now = time.perf_counter()
        if force or now - self._shown >= self.every:
            self._shown = now
            scale = 2**30 if self.unit == "GiB" else 1
            log.info(
                "%s: %.1f%% (%.4g / %.4g %s)",
                self.what,
                100 * done / max(self.total, 1),
                done / scale,
                self.total / scale,
                self.unit,
                extra={"progress": (done, self.total)},
            )

    def advance(self, amount: float = 1) -> None:
        with self._lock:
            self.set(self.done + amount)


@contextlib.contextmanager
def steps(what: str, total: float, unit: str = "", every: float = 1.0) -> Iterator[_Steps]:
    """A stage whose work is ``total`` units: call ``advance`` (or ``set``) on the yielded counter."""
    with stage(what):
        counter = _Steps(what, total, unit, every)
        yield counter
        counter.set(counter.total, force=True)


@contextlib.contextmanager
def bytes_written(folder: Path, total: int, what: str, every: float = 0.5) -> Iterator[None]:
    """Report the bytes written into ``folder`` (the sum of its files' sizes: a staging folder of ours)
    while the block writes ``total`` bytes there, polled by a thread: for writers, such as onnx-ir's
    external data, that report nothing themselves."""
    stop = threading.Event()

    def written() -> int:
        size = 0
        for parent, _, files in os.walk(folder):  # the writer may use a temporary folder inside
            for name in files:
                with contextlib.suppress(OSError):  # renamed or removed since listed
                    size += os.stat(os.path.join(parent, name)).st_size
        return size

    def watch(counter: _Steps) -> None:
        while not stop.wait(every):
            counter.set(written())

    with steps(f"writing {what}", total, "GiB", every) as counter:
        watcher = threading.Thread(target=watch, args=(counter,), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


class TerminalHandler(logging.StreamHandler):
    """Shows progress lines as ``[engram-export] ...``; on a terminal, a record with ``progress`` redraws
    one line as a bar instead of adding lines."""

    WIDTH = 24

    def __init__(self, stream):
        super().__init__(stream)
        self.setFormatter(logging.Formatter("[engram-export] %(message)s"))
        self._bar_open = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            progress = getattr(record, "progress", None)
            line = self.format(record)
            if progress and self.stream.isatty():
                done, total = progress
                filled = int(self.WIDTH * min(done / max(total, 1), 1.0))
                self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {line}\033[K")
                self._bar_open = True
            else:
                self.stream.write(("\n" if self._bar_open else "") + line + "\n")
                self._bar_open = False
            self.flush()
        except Exception:  # as logging.StreamHandler: a broken stream never breaks the work
            self.handleError(record)
