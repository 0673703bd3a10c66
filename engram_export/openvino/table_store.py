"""Where a table's stored bytes live while a runtime serves them: one class per way (``table_memory``).

The row kernel (``row_kernel.py``) reads each looked-up row from the array a store's ``place`` returns;
a store decides which memory that is and what it costs. A new way for a table to live is one new class
here, registered in ``TABLE_STORES``; nothing else in the runtime branches on it.

- ``MappedStore`` (``"mmap"``, the default): the file's pages, read on demand, with random-access advice
  (a cold row reads its page, not megabytes ahead). Load costs nothing whatever the table size; resident
  memory is the rows touched so far, in the page cache (shared by every process serving the file,
  evictable). The only choice for a table larger than RAM. The first lookups pay a page fault per page.
- ``PopulatedStore`` (``"populate"``): the same mapping, every page faulted in at load: load reads the
  whole table (disk speed), resident file-backed memory is the table's size; first requests run as
  fast as later ones.
- ``HugePagesStore`` (``"hugepages"``): an anonymous copy in transparent huge pages (as SGLang keeps
  its host tables): load copies the whole table, private memory grows by its size (not shared, not
  evictable), and random rows cost fewer TLB misses.
- ``TieredStore`` (``"tiered"``, a folder made by ``engram-export calibrate``): the layer's hot rows
  packed in resident memory, optionally a bounded cache of rows read lately, every other row read from
  the table file, a call's misses all at once (``tiered.py``). Resident memory is the hot set plus the
  cache, whatever the table size; the kernel reads through the tier the store opens (``tier``).
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import ClassVar

import numpy as np
import psutil

from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.openvino.memory import huge_page_copy, madvise, populate
from engram_export.openvino.tiered import RowLayout, Tier, open_tier, read_hot_set

__all__ = [
    "TableStore",
    "MappedStore",
    "PopulatedStore",
    "HugePagesStore",
    "TieredStore",
    "TABLE_STORES",
    "table_store",
]


def _available_bytes() -> int:
    """MemAvailable (what can be filled without swapping or evicting much)."""
    return psutil.virtual_memory().available


class TableStore:
    """A way for a table's stored bytes to live in memory. ``place`` gets the bytes as the model holds
    them (a read-only mapping of the file) and returns the array the row kernel reads from (the same
    memory or a copy that the returned array keeps alive)."""

    name: ClassVar[str]
    resident: ClassVar[bool]  # holds the whole table in RAM: refused when it does not fit

    def check_fits(self, nbytes: int) -> None:
        """Refuse, before any byte is touched, a table this store cannot hold."""
        if not self.resident:
            return
        available = _available_bytes()
        if nbytes > available:
            raise EngramError(
                f"table_memory={self.name!r} holds the table in RAM: {nbytes / 2**30:.1f} GiB "
                f"needed, {available / 2**30:.1f} GiB available; use table_memory='mmap'"
            )

    def place(self, data: np.ndarray, name: str) -> np.ndarray:
        raise NotImplementedError

    def tier(self, parts: list[np.ndarray], layout: RowLayout) -> int:
        """The id of the tier the kernel reads ``parts`` (as ``place`` returned them) through; 0: none,
        the kernel reads them directly."""
        return 0

    def mapped_addresses(self) -> list[int]:
        """Where this store serves rows from the pages of files other than the table's (the file guard
        watches them as it watches the table's); none but a shared hot set's."""
        return []


class MappedStore(TableStore):
    name, resident = "mmap", False

    def place(self, data: np.ndarray, name: str) -> np.ndarray:
        madvise(data, mmap.MADV_RANDOM)
        return data


class PopulatedStore(MappedStore):
    name, resident = "populate", True

    def place(self, data: np.ndarray, name: str) -> np.ndarray:
        return populate(super().place(data, name), name)


class HugePagesStore(TableStore):
    name, resident = "hugepages", True

    def place(self, data: np.ndarray, name: str) -> np.ndarray:
        with progress.stage(f"copying {name} into huge pages ({data.nbytes / 2**30:.2f} GiB)"):
            return huge_page_copy(data)


class TieredStore(MappedStore):
    name, resident = "tiered", False

    def __init__(
        self,
        folder: Path,
        layer_file: str,
        cache_bytes: int = 0,
        miss_reads: str = "auto",
        hot_set_memory: str = "private",
    ):
        self.folder, self.layer_file, self.cache_bytes = Path(folder), layer_file, cache_bytes
        self.miss_reads, self.hot_set_memory = miss_reads, hot_set_memory
        self._tiers: dict[tuple, Tier] = {}  # the decode stages share the lookup stage's table: one tier

    def tier(self, parts: list[np.ndarray], layout: RowLayout) -> int:
        key = tuple(part.ctypes.data for part in parts)
        if key not in self._tiers:
            hot = read_hot_set(self.folder, self.layer_file, layout, shared=self.hot_set_memory == "shared")
            self._tiers[key] = open_tier(parts, layout, hot, self.cache_bytes, self.miss_reads)
        return self._tiers[key].id

    def mapped_addresses(self) -> list[int]:
        """Where this store's tiers keep hot rows in the pages of their files (``hot_set_memory="shared"``)."""
        return [part.ctypes.data for tier in self._tiers.values() for part in tier.mapped_parts()]

    def warm(self, rows: np.ndarray) -> int:
        """Read ``rows`` of this layer's table (-1 skipped) into its tier's cache ahead of the lookups
        expected to need them (``tiered.Tier.warm``: hot and cached rows are skipped, a tier without a
        cache reads none); returns the rows read."""
        return sum(tier.warm(rows) for tier in self._tiers.values())

    def stats(self) -> dict[str, int]:
        """The counters of this store's tiers, summed (``tiered.STATS``)."""
        totals: dict[str, int] = {}
        for tier in self._tiers.values():
            for name, value in tier.stats().items():
                totals[name] = totals.get(name, 0) + value
        return totals


TABLE_STORES: dict[str, type[TableStore]] = {
    store.name: store for store in (MappedStore, PopulatedStore, HugePagesStore, TieredStore)
}


def table_store(table_memory: str | TableStore) -> TableStore:
    """The store for a ``table_memory`` name (or the store itself)."""
    if isinstance(table_memory, TableStore):
        return table_memory
    if table_memory not in TABLE_STORES:
        raise EngramError(f"table_memory must be one of {', '.join(TABLE_STORES)}, got {table_memory!r}")
    if table_memory == TieredStore.name:
        raise EngramError(
            "table_memory='tiered' serves the hot set of a calibrated folder: load the folder that "
            "engram-export calibrate wrote"
        )
    return TABLE_STORES[table_memory]()
