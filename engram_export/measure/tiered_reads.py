"""``bench tiered``'s table of reads: how to read a call's misses from a cold table file.

One ``pread`` after another (what a page fault costs, in turn), the tier's two ways (``miss_reads``: the
kernel's readahead of every miss at once, or a pool of threads) on the misses of a 50x14 lookup, and a
cached row read without the queue.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from engram_export.core.text import windows
from engram_export.measure.common import evict_page_cache, format_table
from engram_export.openvino.tiered import MISS_READS
from engram_export.runtime import EngramRuntime

__all__ = ["read_strategies"]


def read_strategies(table: Path, tiered: Path, held_out: np.ndarray, count: int = 4096, rounds: int = 3) -> str:
    """How to read scattered rows of a cold table file at once (medians of ``rounds``, the files evicted
    before each): one pread after another (what a page fault costs, in turn), the tier's two ways
    (``miss_reads``) on the misses of a 50x14 lookup, and a cached row read without the queue."""
    size = table.stat().st_size
    rng = np.random.default_rng(3)
    fd = os.open(table, os.O_RDONLY)
    lines = []
    try:
        times = []
        for _ in range(rounds):
            offsets = (rng.integers(0, size // 256 - 1, count) * 256).tolist()
            evict_page_cache(table.parent)
            start = time.perf_counter()
            for offset in offsets:
                os.pread(fd, 256, offset)
            times.append(time.perf_counter() - start)
        per_row = float(np.median(times)) / count * 1e6
        lines.append([f"one pread after another ({count:,} rows)", f"{np.median(times) * 1e3:.1f}", f"{per_row:.1f}"])
        start = time.perf_counter()
        for offset in offsets:  # read above: in the page cache now
            os.preadv(fd, [bytearray(256)], offset, os.RWF_NOWAIT)
        per_row = (time.perf_counter() - start) / count * 1e6
        lines.append(["a cached row, preadv2(RWF_NOWAIT) in the caller", "-", f"{per_row:.1f}"])
    finally:
        os.close(fd)
    for miss_reads in MISS_READS:
        times, queued = [], 0
        for round_ in range(rounds):
            evict_page_cache(tiered)
            runtime = EngramRuntime(tiered, table_memory="tiered", miss_reads=miss_reads)
            layer = runtime.layer_ids[0]
            ids = windows(held_out[round_ * 4999 :], 14, 50)
            start = time.perf_counter()
            runtime[layer].lookup(ids)
            times.append(time.perf_counter() - start)
            stats = runtime[layer].table_stats()
            queued = stats["queued_rows"]
            wait_ms = stats["read_wait_ms"]
            del runtime
        lines.append(
            [
                f"the tier, miss_reads={miss_reads!r}: a 50x14 lookup, {queued:,} rows from disk",
                f"{np.median(times) * 1e3:.1f}",
                f"{wait_ms * 1e3 / max(1, queued):.1f}",
            ]
        )
    return f"reading scattered rows of a cold {size / 2**30:.1f} GiB table file:\n" + format_table(
        lines, ["how", "ms", "us a row read"]
    )
