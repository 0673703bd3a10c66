"""Reads of a tiered table (extension/table_tier.cpp) through the row reader: rows warmed into the cache
ahead of need, a call's own counts, and misses read through io_uring, each equal to the whole table's
rows bit for bit."""

from __future__ import annotations

import gc
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.folders.calibration import calibrate
from engram_export.measure.common import evict_page_cache
from engram_export.openvino.row_reader import COUNTS
from engram_export.runtime.rows import EngramRows
from tests.helpers import package_prose

UNAVAILABLE = r"^table_memory='tiered': miss_reads='uring': io_uring is not available here \(.+\)$"


@pytest.fixture(scope="module")
def calibrated(text_folders, tmp_path_factory) -> dict[str, Path]:
    """The FP8 V4.1 folder (E8M0 scales) and the demo's u4 table (scales, u4 zero points), calibrated."""
    root = tmp_path_factory.mktemp("tier_reads")
    text = root / "prose.txt"
    text.write_text(package_prose()[:60_000])
    folders = {}
    for name in ("v41 f32", "demo u4"):
        folders[name] = root / name.replace(" ", "_")
        calibrate(text_folders[name], folders[name], [text], "30%")
    return folders


def _read(rows: EngramRows, layer: int, ids: np.ndarray, form: str = "packed") -> tuple[np.ndarray, dict]:
    """The rows of ``ids`` and the call's own counts (``RowReader.read(counts=)``)."""
    reader = rows[layer]._reader
    out, counts = reader.new_out(ids.shape, form), np.zeros(len(COUNTS), np.uint64)
    reader.read(ids, out, form, counts=counts)
    return out, dict(zip(COUNTS, counts.tolist(), strict=True))


def _tiered(folder: Path, **settings) -> EngramRows | None:
    """A tiered EngramRows, or None where ``miss_reads="uring"`` is refused (the refusal checked)."""
    try:
        return EngramRows(folder, table_memory="tiered", **settings)
    except EngramError as exc:
        if settings.get("miss_reads") != "uring":
            raise
        assert re.match(UNAVAILABLE, str(exc)), str(exc)
        return None


def test_warmed_rows_count_once_as_candidate_hits(calibrated):
    folder = calibrated["v41 f32"]
    whole = EngramRows(folder, table_memory="populate")
    tiered = EngramRows(folder, table_memory="tiered", cache_budget="1MiB")
    layer = tiered.layer_ids[0]
    store = tiered[layer]._store
    ids = np.random.default_rng(1).integers(0, tiered[layer].table_rows, 300)
    before = store.stats()
    warmed = store.warm(np.r_[ids, -1, ids[:7]])  # -1 skipped, repeats read once
    after = store.stats()
    assert after["warm_rows_read"] - before["warm_rows_read"] == warmed > 0
    assert after["rows_read"] == before["rows_read"] and after["lookups"] == before["lookups"]
    assert store.warm(ids) == 0  # every row hot or cached now

    rows, first = _read(tiered, layer, ids)
    assert np.array_equal(rows, whole.read(layer, ids, form="packed"))
    assert first["candidate"] + first["hot"] == ids.size and first["read"] == first["cache"] == 0, first
    rows, second = _read(tiered, layer, ids, "bf16")  # found again: cache hits, no longer candidates
    assert np.array_equal(rows, whole.read(layer, ids, form="bf16"))
    assert second["cache"] == first["candidate"] and second["candidate"] == 0, second
    stats = store.stats()
    assert stats["candidate_hits"] - after["candidate_hits"] == first["candidate"]
    assert stats["rows_read"] == before["rows_read"]  # nothing read by the lookups themselves


def test_a_calls_counts_add_up_to_its_lookups_and_to_the_counters(calibrated):
    folder = calibrated["demo u4"]
    tiered = EngramRows(folder, table_memory="tiered", cache_budget="8KiB")
    layer = tiered.layer_ids[0]
    store = tiered[layer]._store
    rng = np.random.default_rng(2)
    table_rows = tiered[layer].table_rows
    store.warm(rng.integers(0, table_rows, 20))
    for _ in range(3):  # hot rows, rows read, rows cached by the call before, candidates
        ids = rng.integers(-1, table_rows, (16, 24))
        ids[1] = ids[0]  # a row looked up twice in a call
        before = store.stats()
        _, counts = _read(tiered, layer, ids)
        after = store.stats()
        delta = {name: after[name] - before[name] for name in after}
        lookups = int(np.count_nonzero(ids != -1))
        assert counts["hot"] + counts["cache"] + counts["candidate"] + counts["read"] == lookups == delta["lookups"]
        assert counts["resident"] == 0 and counts["page_cache_rows"] <= counts["rows_read"] <= counts["read"]
        pairs = {"hot": "hot_hits", "cache": "cache_hits", "candidate": "candidate_hits", "read": "read_lookups"}
        pairs |= {"rows_read": "rows_read", "page_cache_rows": "page_cache_rows", "read_ns": "read_ns"}
        assert {name: counts[name] for name in pairs} == {name: delta[stat] for name, stat in pairs.items()}
    assert after["lookups"] == sum(after[name] for name in pairs.values() if name.endswith(("hits", "lookups")))
    mapped = EngramRows(folder, table_memory="mmap")
    _, counts = _read(mapped, layer, ids)
    assert counts == {**dict.fromkeys(COUNTS, 0), "resident": int(np.count_nonzero(ids != -1))}


def _evicted(folder: Path) -> bool:
    """Drop ``folder``'s files from the page cache; True if the table files really left it (a table in
    the IR's .bin shares its pages with weights the runtime holds: False)."""
    gc.collect()
    evict_page_cache(folder)
    fds = [os.open(path, os.O_RDONLY) for path in folder.glob("*.safetensors")]
    try:
        return bool(fds) and all(_not_cached(fd) for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)


def _not_cached(fd: int) -> bool:
    try:
        os.preadv(fd, [bytearray(64)], os.fstat(fd).st_size // 2, os.RWF_NOWAIT)
        return False
    except BlockingIOError:
        return True


@pytest.mark.parametrize("form", ["v41 f32", "demo u4"])
def test_uring_reads_what_readahead_reads(calibrated, form, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(calibrated[form], folder)  # files no other test maps: their pages can leave the cache
    readahead = EngramRows(folder, table_memory="tiered", miss_reads="readahead")
    default = EngramRows(folder, table_memory="tiered")  # "auto": io_uring where allowed, else the readahead
    uring = _tiered(folder, miss_reads="uring")
    ids = np.random.default_rng(3).integers(-1, default[default.layer_ids[0]].table_rows, (32, 24))
    layer = default.layer_ids[0]
    assert np.array_equal(default.read(layer, ids, form="packed"), readahead.read(layer, ids, form="packed"))
    if uring is None:
        return
    layer = uring.layer_ids[-1]
    ids = np.random.default_rng(4).integers(-1, uring[layer].table_rows, (32, 24))
    evicted = _evicted(folder)
    rows, counts = _read(uring, layer, ids)
    if evicted:
        assert counts["page_cache_rows"] < counts["rows_read"], counts  # some read from the disk
    assert uring[layer].stats()["queued_rows"] == counts["rows_read"] - counts["page_cache_rows"]
    _evicted(folder)
    expected, _ = _read(readahead, layer, ids)
    assert np.array_equal(rows, expected)
    assert np.array_equal(uring.read(layer, ids, form="f32"), readahead.read(layer, ids, form="f32"))


def test_a_truncated_table_fails_uring_as_it_fails_readahead(calibrated, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(calibrated["v41 f32"], folder)  # copies: the test cuts them
    opened = {ways: _tiered(folder, miss_reads=ways) for ways in ("readahead", "uring")}
    layer = opened["readahead"].layer_ids[0]
    ids = np.random.default_rng(4).integers(0, opened["readahead"][layer].table_rows, 64)
    for shard in folder.glob("*.safetensors"):
        os.truncate(shard, 4096)
    errors = {}
    for ways, rows in opened.items():
        if rows is None:
            continue
        with pytest.raises(EngramError) as refused:
            _read(rows, layer, ids)
        errors[ways] = str(refused.value)
    assert re.fullmatch(
        r"reading row \d+ of the table file: the file ends before it \(truncated\?\)", errors["readahead"]
    )
    assert errors.get("uring", errors["readahead"]) == errors["readahead"]


def test_a_warm_of_a_row_outside_the_table_is_refused_and_reads_nothing(calibrated):
    tiered = EngramRows(calibrated["v41 f32"], table_memory="tiered", cache_budget="1MiB")
    layer = tiered.layer_ids[0]
    store, table_rows = tiered[layer]._store, tiered[layer].table_rows
    before = store.stats()
    for ids, bad, at in ((np.array([5, table_rows]), table_rows, 1), (np.array([5, -1, -2]), -2, 2)):
        with pytest.raises(
            EngramError, match=rf"^warm: row {bad} \(at index {at}\) is outside the table's {table_rows} rows"
        ):
            store.warm(ids)
    assert store.stats() == before
    assert (
        EngramRows(calibrated["v41 f32"], table_memory="tiered")[layer]._store.warm(np.array([5, 6])) == 0
    )  # no cache


def test_uring_reads_from_many_threads_at_once(calibrated):
    """A ring per thread: reads started from threads (and OpenVINO's) at once equal the whole table's."""
    folder = calibrated["v41 f32"]
    uring = _tiered(folder, miss_reads="uring", cache_budget="16KiB")
    if uring is None:
        return
    layer = uring.layer_ids[0]
    batches = [np.random.default_rng(seed).integers(-1, uring[layer].table_rows, (8, 24)) for seed in range(24)]
    evicted = _evicted(folder)
    pending = [uring[layer].start(ids, form="packed") for ids in batches]
    rows = [started.wait() for started in pending]
    assert uring[layer].stats()["queued_rows"] > 0 or not evicted
    whole = EngramRows(folder, table_memory="populate")
    for ids, read in zip(batches, rows, strict=True):
        assert np.array_equal(read, whole.read(layer, ids, form="packed"))
