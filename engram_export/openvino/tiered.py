"""A table in tiers: the hot rows calibration chose, packed in memory; every other row read from its file.

``engram-export calibrate`` (``folders/calibration.py``) writes a layer's hot set as ``.npy`` files beside
its model: ``rows`` (the sorted table rows) and, in row order, each part of their stored bytes
(``codes``; ``scales`` and ``zero_points`` where the table has them; u4 zero points stay packed two per
byte, now across hot rows). ``open_tier`` reads them into resident memory (huge pages where the kernel
gives them), builds the bitmap and per-512-row ranks that find a row's place in O(1), and hands the
extension (``extension/table_tier.hpp``) the files the rest is read from: it finds each part's file and
offset from the mapping the model already holds (``/proc/self/maps``), so nothing is copied and the
hot rows are the only bytes read at load. The extension's spec struct is copied here as ctypes
(``_Spec``); a library whose layout version or struct size differs is refused when it is opened.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import weakref
from functools import cache
from pathlib import Path

import numpy as np

from engram_export.core.errors import EngramError
from engram_export.openvino.extension import check_struct, library_path
from engram_export.openvino.memory import file_mappings, huge_page_copy, populate

__all__ = [
    "RowLayout",
    "HOT_PARTS",
    "MISS_READS",
    "HOT_SET_MEMORY",
    "hot_set_files",
    "pack_hot_rows",
    "row_parts",
    "packed_parts",
    "read_hot_set",
    "hot_set",
    "open_tier",
    "Tier",
    "STATS",
]

HOT_PARTS = ("rows", "codes", "scales", "zero_points")
STATS = (
    "lookups",
    "hot_hits",
    "cache_hits",
    "rows_read",
    "bytes_read",
    "page_cache_rows",
    "queued_rows",
    "read_ns",
    "calls",
    "candidate_hits",
    "read_lookups",
    "warm_calls",
    "warm_rows_read",
)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How one table row is stored: its codes, scale and zero-point bytes (``row_kernel.StoredTable``)."""

    table_rows: int
    row_bytes: int  # codes
    scale_bytes: int = 0  # per row; 0: none
    zero_bits: int = 0  # per row; 0: none
    zero_value_bits: int = 8  # 4: u4 zero points, packed two per byte across rows

    @property
    def bytes_per_row(self) -> float:
        return self.row_bytes + self.scale_bytes + self.zero_bits / 8  # u4 zero points: half a byte a group

    def part_sizes(self, rows: int) -> dict[str, int]:
        """Bytes of each stored part for ``rows`` rows, as the hot set packs them."""
        sizes = {"codes": rows * self.row_bytes}
        if self.scale_bytes:
            sizes["scales"] = rows * self.scale_bytes
        if self.zero_bits:
            sizes["zero_points"] = (rows * self.zero_bits + 7) // 8
        return sizes


def hot_set_files(layer_file: str) -> dict[str, str]:
    """Part -> file name of the hot set of the model file ``layer_file`` (``layer_14.xml`` ->
    ``layer_14.hot.rows.npy``, ...)."""
    stem = layer_file.rsplit(".", 1)[0]
    return {part: f"{stem}.hot.{part}.npy" for part in HOT_PARTS}


def _zero_nibbles(packed: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (packed[index >> 1] >> ((index & 1) * 4).astype(np.uint8)) & 0xF


def pack_hot_rows(parts: dict[str, np.ndarray], layout: RowLayout, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The stored bytes of ``rows`` (sorted, unique) packed in their order: part -> u8 array.
    ``parts``: the table's stored bytes (``codes`` [R, row bytes]; ``scales``, ``zero_points`` flat)."""
    gathered = {"codes": parts["codes"][rows]}
    if layout.scale_bytes:
        gathered["scales"] = parts["scales"].reshape(-1, layout.scale_bytes)[rows]
    if layout.zero_bits:
        groups = layout.zero_bits // layout.zero_value_bits
        if layout.zero_value_bits == 8:
            gathered["zero_points"] = parts["zero_points"].reshape(-1, groups)[rows]
        else:
            index = (rows[:, None] * groups + np.arange(groups)).reshape(-1)
            gathered["zero_points"] = _zero_nibbles(np.asarray(parts["zero_points"]), index).reshape(len(rows), groups)
    return packed_parts(gathered, layout)


def row_parts(packed: dict[str, np.ndarray], layout: RowLayout, rows: int) -> dict[str, np.ndarray]:
    """A packing of ``rows`` rows (``pack_hot_rows``) as one array per part with a row per row: codes
    [rows, row bytes], scales [rows, scale bytes], zero points [rows, groups] (u4 unpacked to a byte each)."""
    parts = {"codes": np.asarray(packed["codes"]).reshape(rows, layout.row_bytes)}
    if layout.scale_bytes:
        parts["scales"] = np.asarray(packed["scales"]).reshape(rows, layout.scale_bytes)
    if layout.zero_bits:
        groups = layout.zero_bits // layout.zero_value_bits
        zeros = np.asarray(packed["zero_points"]).reshape(-1)
        if layout.zero_value_bits == 4:
            zeros = np.stack([zeros & 0xF, zeros >> 4], 1).reshape(-1)[: rows * groups]
        parts["zero_points"] = zeros.reshape(rows, groups)
    return parts


def packed_parts(parts: dict[str, np.ndarray], layout: RowLayout) -> dict[str, np.ndarray]:
    """Arrays with a row per row (``row_parts``' form) packed: u4 zero points two per byte across rows."""
    packed = {"codes": np.ascontiguousarray(parts["codes"])}
    if "scales" in parts:
        packed["scales"] = np.ascontiguousarray(parts["scales"]).reshape(-1)
    if "zero_points" in parts:
        zeros = np.ascontiguousarray(parts["zero_points"], np.uint8).reshape(-1)
        if layout.zero_value_bits == 4:
            if len(zeros) % 2:
                zeros = np.append(zeros, np.uint8(0))
            zeros = (zeros[0::2] | (zeros[1::2] << 4)).astype(np.uint8)
        packed["zero_points"] = zeros
    return packed


@dataclasses.dataclass
class HotSet:
    """A layer's hot rows in resident memory, with the bitmap and ranks that find them."""

    rows: int
    bits: np.ndarray  # u64, one bit per table row, padded to whole blocks of 512 rows
    ranks: np.ndarray  # u64, set bits before each block
    parts: dict[str, np.ndarray]  # part -> packed stored bytes (resident)
    mapped: bool = False  # the parts are the pages of their files (shared), not copies


def read_hot_set(folder: Path, layer_file: str, layout: RowLayout, shared: bool = False) -> HotSet:
    """The hot set of ``layer_file`` read from ``folder`` into memory, checked against ``layout``: copied
    into huge pages of this process, or (``shared``) its files' pages read in, which every process that
    maps them shares."""
    names = hot_set_files(layer_file)
    arrays = {}
    for part, name in names.items():
        if part in ("rows", *layout.part_sizes(0)):
            try:
                arrays[part] = np.load(folder / name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise EngramError(f"hot set {folder / name}: cannot read it ({exc})") from exc
    rows = arrays.pop("rows")
    if rows.dtype != np.int64 or rows.ndim != 1:
        raise EngramError(f"hot set {folder / names['rows']}: expected int64 rows, got {rows.dtype} {rows.shape}")
    rows = np.asarray(rows)
    if len(rows) and (rows[0] < 0 or rows[-1] >= layout.table_rows or np.any(np.diff(rows) <= 0)):
        raise EngramError(
            f"hot set {folder / names['rows']}: rows must be sorted, unique and in [0, {layout.table_rows})"
        )
    for part, size in layout.part_sizes(len(rows)).items():
        if arrays[part].dtype != np.uint8 or arrays[part].nbytes != size:
            raise EngramError(
                f"hot set {folder / names[part]}: {arrays[part].nbytes} bytes of {arrays[part].dtype}, "
                f"expected {size} bytes of uint8 for {len(rows)} rows of this table"
            )
    if shared:
        read_in = {part: populate(np.asarray(array).reshape(-1), names[part]) for part, array in arrays.items()}
        return hot_set(rows, read_in, layout, mapped=True)
    return hot_set(rows, {part: huge_page_copy(array) for part, array in arrays.items()}, layout)


def hot_set(rows: np.ndarray, parts: dict[str, np.ndarray], layout: RowLayout, mapped: bool = False) -> HotSet:
    """The hot set of ``rows`` (sorted, unique) whose stored bytes ``parts`` holds packed in their order
    (``pack_hot_rows``), in resident memory the caller gives: the bitmap and ranks that find them."""
    words = -(-layout.table_rows // 512) * 8
    bits = np.zeros(words, np.uint64)
    if len(rows):
        word = rows >> 6
        starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        bits[word[starts]] = np.add.reduceat(np.left_shift(np.uint64(1), (rows & 63).astype(np.uint64)), starts)
    per_block = np.bitwise_count(bits).reshape(-1, 8).sum(axis=1, dtype=np.uint64)
    ranks = np.concatenate([[0], np.cumsum(per_block)[:-1]]).astype(np.uint64)
    return HotSet(len(rows), bits, ranks, parts, mapped)


def _file_region(array: np.ndarray) -> tuple[str, int, int, int] | None:
    """(path, offset, device, inode) of the file mapped under ``array``'s first byte, or None for anonymous memory."""
    address = array.ctypes.data
    for mapping in file_mappings():
        if mapping.start <= address < mapping.end:
            return mapping.path, mapping.offset + address - mapping.start, mapping.device, mapping.inode
    return None


# The layout version of ``EngramTierSpec`` that ``_Spec`` copies (``ENGRAM_TIER_ABI_VERSION`` in
# extension/table_tier.hpp): raised there and here together whenever the struct changes.
TIER_ABI_VERSION = 2


class _Spec(ctypes.Structure):
    """``EngramTierSpec`` of extension/table_tier.hpp, field for field (``_check_layout`` holds them to it)."""

    _fields_ = [
        ("table_rows", ctypes.c_uint64),
        ("part_bytes", ctypes.c_uint64 * 2),
        ("zero_bits", ctypes.c_uint64),
        ("zero_value_bits", ctypes.c_uint64),
        ("fds", ctypes.c_int32 * 3),
        ("offsets", ctypes.c_uint64 * 3),
        ("memory", ctypes.c_void_p * 3),
        ("hot_bits", ctypes.c_void_p),
        ("hot_ranks", ctypes.c_void_p),
        ("hot_rows", ctypes.c_uint64),
        ("hot_parts", ctypes.c_void_p * 3),
        ("cache_bytes", ctypes.c_uint64),
        ("io_threads", ctypes.c_uint32),
        ("miss_reads", ctypes.c_uint32),
    ]


def _check_layout(library, path: str) -> None:
    """Refuse a library (at ``path``) whose ``EngramTierSpec`` is not ``_Spec``: a tier opened through
    a struct of another layout would read its fields from the wrong bytes."""
    symbols = ("engram_tier_abi_version", "engram_tier_spec_size")
    expected = (TIER_ABI_VERSION, ctypes.sizeof(_Spec))
    check_struct(library, path, symbols, expected, "tier layout", "openvino/tiered.py")


@cache
def _library():
    path = str(library_path())
    library = ctypes.CDLL(path)  # the library OpenVINO loaded: one registry of tiers
    _check_layout(library, path)
    library.engram_tier_open.argtypes = [ctypes.POINTER(_Spec), ctypes.c_char_p, ctypes.c_size_t]
    library.engram_tier_open.restype = ctypes.c_int64
    library.engram_tier_close.argtypes = [ctypes.c_int64]
    library.engram_tier_stats.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    library.engram_tier_warm.argtypes = [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    library.engram_tier_warm.restype = ctypes.c_int64
    return library


class Tier:
    """An open tier of the extension: its id (``EngramGatherRows``'s ``tier``), its counters, and what it
    reads (kept alive while it is open; closed when this object goes)."""

    def __init__(self, tier_id: int, parts: list[np.ndarray], hot: HotSet | None):
        self.id, self._parts, self._hot = tier_id, parts, hot
        self._close = weakref.finalize(self, _library().engram_tier_close, tier_id)

    def mapped_parts(self) -> list[np.ndarray]:
        """The hot rows' parts where they are the pages of their files (a shared hot set), else none."""
        hot = self._hot
        return list(hot.parts.values()) if hot is not None and hot.mapped else []

    def warm(self, rows: np.ndarray) -> int:
        """Read ``rows`` (table rows; -1 skipped) that are neither hot nor cached into the cache, ahead of
        the calls that will look them up (the first such lookup counts as a ``candidate_hits``); returns
        the rows read. Every row is checked before any is read; a tier without a cache reads none."""
        ids = np.ascontiguousarray(rows, np.int64).reshape(-1)
        error = ctypes.create_string_buffer(512)
        read = _library().engram_tier_warm(self.id, ids.ctypes.data, ids.size, error, len(error))
        if read < 0:
            raise EngramError(f"warm: {error.value.decode()}")
        return read

    def stats(self) -> dict[str, int]:
        values = (ctypes.c_uint64 * len(STATS))()
        _library().engram_tier_stats(self.id, values, len(STATS))
        return dict(zip(STATS, (int(v) for v in values), strict=True))


HOT_SET_MEMORY = ("private", "shared")  # a hot set copied into this process's huge pages, or its files' pages
# the first is the default: io_uring where allowed (fastest where measured, docs/tiered.md), else readahead
MISS_READS = ("auto", "readahead", "threads", "uring")


def open_tier(
    parts: list[np.ndarray],
    layout: RowLayout,
    hot: HotSet | None,
    cache_bytes: int,
    miss_reads: str = "auto",
    io_threads: int = 64,
) -> Tier:
    """A tier over the table whose stored bytes are ``parts`` (codes, [scales], [zero points], as mapped
    by the model), its ``hot`` rows resident, misses read from the files under those mappings: all handed
    to the kernel's readahead at once and then read in the calling thread (``"readahead"``), read on
    ``io_threads`` threads (``"threads"``, for file systems that ignore the readahead hint), or submitted
    as one batch to an io_uring of the calling thread (``"uring"``; refused where io_uring is not allowed),
    or the last where this process may use io_uring and else the first (``"auto"``)."""
    spec = _Spec(table_rows=layout.table_rows, zero_bits=layout.zero_bits, zero_value_bits=layout.zero_value_bits)
    spec.part_bytes[:] = [layout.row_bytes, layout.scale_bytes]
    spec.cache_bytes, spec.io_threads = cache_bytes, io_threads
    spec.miss_reads = {"threads": 0, "readahead": 1, "uring": 2, "auto": 3}[miss_reads]
    present = [True, bool(layout.scale_bytes), bool(layout.zero_bits)]
    files = []
    try:
        arrays = iter(parts)
        for index, used in enumerate(present):
            spec.fds[index] = -1
            if not used:
                continue
            array = next(arrays)
            region = _file_region(array)
            if region is None:  # a table inside the model file, already in memory: "read" from there
                spec.memory[index] = array.ctypes.data
                continue
            path, offset, device, inode = region
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            files.append(fd)
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != (device, inode):
                raise EngramError(f"table_memory='tiered': {path} is no longer the file the model mapped")
            spec.fds[index], spec.offsets[index] = fd, offset
        if hot is not None and hot.rows:
            spec.hot_rows = hot.rows
            spec.hot_bits, spec.hot_ranks = hot.bits.ctypes.data, hot.ranks.ctypes.data
            for index, part in enumerate(("codes", "scales", "zero_points")):
                if part in hot.parts:
                    spec.hot_parts[index] = hot.parts[part].ctypes.data
        error = ctypes.create_string_buffer(512)
        tier_id = _library().engram_tier_open(ctypes.byref(spec), error, len(error))
        if tier_id == 0:
            raise EngramError(f"table_memory='tiered': {error.value.decode()}")
        return Tier(tier_id, parts, hot)
    except OSError as exc:
        raise EngramError(f"table_memory='tiered': cannot open the table file ({exc.strerror})") from exc
    finally:
        for fd in files:  # the tier opens the files again for itself
            os.close(fd)
