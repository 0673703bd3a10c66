"""``bench tiered``'s last table: how fast ``calibrate`` counts a text whose every n-gram is new (the
words of the bench's text in shuffled order: the most distinct rows a text of that size can reach, the
worst case for counting's time and memory)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from engram_export.core.text import read_text
from engram_export.folders.calibration import calibrate
from engram_export.measure.common import format_table

__all__ = ["calibration_speed", "CALIBRATE_SPEED_BUDGET"]

CALIBRATE_SPEED_BUDGET = "0.01%"  # the hot set calibrate's speed is timed with: little to pack


def _shuffled_text(texts: list[Path], path: Path, mib: int) -> Path:
    """``mib`` MiB of the words of ``texts`` in shuffled order, paragraphs of 100 words (written once)."""
    if path.is_file() and path.stat().st_size >= mib << 20:
        return path
    words = np.array(" ".join(read_text(text) for text in texts).split(), dtype=object)
    rng, written = np.random.default_rng(2), 0
    with open(path, "w", encoding="utf-8") as file:
        while written < mib << 20:
            shuffled = words[rng.permutation(len(words))]
            text = "\n\n".join(" ".join(shuffled[at : at + 100]) for at in range(0, len(shuffled), 100)) + "\n\n"
            file.write(text)
            written += len(text.encode())
    return path


def calibration_speed(compiled: Path, texts: list[Path], workdir: Path, mib: int) -> str:
    """``calibrate`` on ``mib`` MiB of the text's words in shuffled order: every n-gram is new, so it
    reaches the most distinct rows a text of that size can (the worst case for counting's time and memory)."""
    text = _shuffled_text(texts, workdir / f"shuffled_{mib}MiB.txt", mib)
    output = workdir / "calibration_speed"
    shutil.rmtree(output, ignore_errors=True)
    process, peak, done = psutil.Process(), [0], threading.Event()
    start_rss = process.memory_info().rss

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], process.memory_info().rss - start_rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.perf_counter()
    report = calibrate(compiled, output, [text], CALIBRATE_SPEED_BUDGET)
    seconds = time.perf_counter() - began
    done.set()
    watcher.join()
    shutil.rmtree(output, ignore_errors=True)
    size = text.stat().st_size
    tokens = report["text"]["tokens"]
    reached = sum(entry["rows_reached"] for entry in report["layers"].values())
    row = [
        f"{size / 2**20:,.0f}",
        f"{tokens:,}",
        f"{seconds:.1f}",
        f"{tokens / seconds:,.0f}",
        f"{size / 2**20 / seconds:.2f}",
        f"{seconds * 2**30 / size / 60:.1f}",
        f"{reached:,}",
        f"{peak[0] / 2**20:,.0f}",
    ]
    headers = ["text MiB", "tokens", "s", "tokens/s", "MiB/s", "min a GiB", "rows reached", "peak RSS growth MiB"]
    return (
        f"calibrate speed ({len(report['layers'])} layers, {os.cpu_count()} cores): the words of the text in "
        f"shuffled order, every n-gram new (the most rows a text of this size reaches); tokenize, hash, count, "
        f"choose and write a {CALIBRATE_SPEED_BUDGET} hot set (packing a larger one is reading the table)\n"
        f"{format_table([row], headers)}"
    )
