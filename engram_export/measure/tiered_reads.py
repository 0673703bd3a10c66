"""``bench tiered``'s table of reads: how to read a call's misses from a cold table file.

One ``pread`` after another (what a page fault costs, in turn), a cached row read without the queue, and
the tier's ways (``miss_reads``: the kernel's readahead of every miss at once, a pool of threads, one
io_uring batch) on the misses of decode steps of B=1, 8 and 64 (24 lookups a token, as V4.1 makes in a
layer) and of a 50x14 lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from engram_export.core.errors import EngramError
from engram_export.core.text import windows
from engram_export.measure.common import evict_page_cache, format_table
from engram_export.openvino.row_reader import COUNTS
from engram_export.openvino.tiered import MISS_READS
from engram_export.runtime import EngramRuntime
from engram_export.runtime.rows import EngramRows

__all__ = ["read_strategies"]

DECODE_BATCHES = (1, 8, 64)
WAYS = tuple(way for way in MISS_READS if way != "auto")  # "auto" is one of the others
LOOKUPS_A_TOKEN = 24  # V4.1: 8 heads x 3 n-gram orders, in each layer


def _one_after_another(table: Path, count: int, rounds: int) -> list[list[str]]:
    size = table.stat().st_size
    rng = np.random.default_rng(3)
    fd = os.open(table, os.O_RDONLY)
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
        lines = [[f"one pread after another ({count:,} rows)", f"{np.median(times) * 1e3:.1f}", f"{per_row:.1f}"]]
        start = time.perf_counter()
        for offset in offsets:  # read above: in the page cache now
            os.preadv(fd, [bytearray(256)], offset, os.RWF_NOWAIT)
        per_row = (time.perf_counter() - start) / count * 1e6
        lines.append(["a cached row, preadv2(RWF_NOWAIT) in the caller", "-", f"{per_row:.1f}"])
    finally:
        os.close(fd)
    return lines


def _decode_steps(tiered: Path, miss_reads: str, rounds: int) -> list[list[str]]:
    """The rows of decode steps (random rows: nearly all misses), the folder evicted before each."""
    try:
        rows = EngramRows(tiered, table_memory="tiered", miss_reads=miss_reads)
    except EngramError as exc:
        return [[f"miss_reads={miss_reads!r}: {exc}", "-", "-"]]
    layer = rows.layer_ids[0]
    reader = rows[layer]._reader
    rng = np.random.default_rng(5)
    lines = []
    for batch in DECODE_BATCHES:
        times, waits, disk = [], [], []
        for _ in range(rounds):
            ids = rng.integers(0, rows[layer].table_rows, (batch, LOOKUPS_A_TOKEN))
            out, counts = reader.new_out(ids.shape, "packed"), np.zeros(len(COUNTS), np.uint64)
            evict_page_cache(tiered)
            start = time.perf_counter()
            reader.read(ids, out, "packed", counts=counts)
            times.append(time.perf_counter() - start)
            call = dict(zip(COUNTS, counts.tolist(), strict=True))
            waits.append(call["read_ns"] / 1e3)
            disk.append(call["rows_read"] - call["page_cache_rows"])
        lines.append(
            [
                f"miss_reads={miss_reads!r}: a decode step of B={batch}, {int(np.median(disk)):,} rows from disk",
                f"{np.median(times) * 1e3:.2f}",
                f"{np.sum(waits) / max(1, np.sum(disk)):.1f}",
            ]
        )
    return lines


def _lookup(tiered: Path, held_out: np.ndarray, miss_reads: str, rounds: int) -> list[list[str]]:
    times, queued, wait_ms = [], 0, 0.0
    for round_ in range(rounds):
        evict_page_cache(tiered)
        try:
            runtime = EngramRuntime(tiered, table_memory="tiered", miss_reads=miss_reads)
        except EngramError:
            return []  # said once, by the decode steps
        layer = runtime.layer_ids[0]
        ids = windows(held_out[round_ * 4999 :], 14, 50)
        start = time.perf_counter()
        runtime[layer].lookup(ids)
        times.append(time.perf_counter() - start)
        stats = runtime[layer].table_stats()
        queued, wait_ms = stats["queued_rows"], stats["read_wait_ms"]
        del runtime
    return [
        [
            f"miss_reads={miss_reads!r}: a 50x14 lookup, {queued:,} rows from disk",
            f"{np.median(times) * 1e3:.1f}",
            f"{wait_ms * 1e3 / max(1, queued):.1f}",
        ]
    ]


def read_strategies(table: Path, tiered: Path, held_out: np.ndarray, count: int = 4096, rounds: int = 3) -> str:
    """How to read scattered rows of a cold table file at once (medians of ``rounds``, of 5x as many for
    the decode steps; the files evicted before each): one pread after another (what a page fault costs,
    in turn), a cached row read without the queue, and each of the tier's ``miss_reads`` on decode steps
    and on a 50x14 lookup (ms: the call; us a row read: the time waited for the rows from disk)."""
    lines = _one_after_another(table, count, rounds)
    for miss_reads in WAYS:
        lines += _decode_steps(tiered, miss_reads, rounds * 5)
    for miss_reads in WAYS:
        lines += _lookup(tiered, held_out, miss_reads, rounds)
    size = table.stat().st_size
    return f"reading scattered rows of a cold {size / 2**30:.1f} GiB table file:\n" + format_table(
        lines, ["how", "ms", "us a row read"]
    )
