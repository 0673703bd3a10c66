"""The row API: a folder's tables as rows by id, for callers that hash and fuse themselves.

vLLM and SGLang run the hash and the fuse on the GPU; what they need from the host is the rows of the
hash ids they computed (ids into one layer's table, as both number them: ``hash % prime + offset``),
early enough. ``EngramRows(folder, ...)`` opens the tables of a folder (exported, compiled or
calibrated) with any table memory (``mmap``, ``populate``, ``hugepages``, ``tiered`` with a cache) or
served by shards (``tables="ray://NAME"``), and ``rows.read(layer, ids, out, form=...)`` writes the rows
into the caller's buffer: as stored (``"packed"``: codes, scales and zero points of a row back to back,
V4.1's 256 FP8 codes + 8 E8M0 bytes = 264 bytes, as vLLM's packed lookup reads them; ``"codes"`` or
``"scales"`` alone, as SGLang stages them) or decoded (``"bf16"``, ``"f32"``). ``start`` issues a read
and returns; its handle's ``wait`` collects it. ``prefetch`` reads rows a later call may need (a draft
model's tokens, the last logits' top-k, a queued prompt) into a tiered table's cache; ``recent``
says, per call, how long its caller waited and where its rows came from. Every read goes through the
extension's row reader, the code the runtime's lookup stage runs (``openvino/row_reader.py``), so rows
are the runtime's bit for bit. Many threads may call one ``EngramRows`` at once.

Ids are checked before any row is read: -1 (the id both engines pad with) gives a zero row, as does an
id outside ``owned`` (a tensor-parallel rank's rows); any other id outside the table is refused in one
line. ``docs/engines.md`` has the engines' plug-ins built on this.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engram_export.core.errors import EngramError
from engram_export.core.integrity import FileChecks
from engram_export.folders.manifest import read_manifest
from engram_export.openvino import row_kernel
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.file_guard import guard_mappings
from engram_export.openvino.row_reader import COUNTS, E8M0_READINGS, FORMS, RowReader
from engram_export.openvino.stages import split_stages
from engram_export.openvino.table_store import TieredStore, table_store
from engram_export.runtime.model import LayerMapping, remote_tables, tiered_stores
from engram_export.runtime.options import RuntimeOptions
from engram_export.runtime.verification import Verification

__all__ = ["EngramRows", "LayerRows", "PendingRows", "FORMS", "ROW_OPTIONS"]

# the EngramRuntime options that say where a table's rows are and how they are checked; the others
# (precision, device, threads, ...) run the fuse, which callers of the row API do themselves
ROW_OPTIONS = (
    "table_memory",
    "cache_budget",
    "miss_reads",
    "hot_set_memory",
    "tables",
    "shard_deadline",
    "ray_address",
    "check_hashes",
)
READS = ("reads", "rows", "prefetches")  # each layer's own counters, beside its store's
RECENT_CALLS = 256  # calls each layer keeps the record of (``LayerRows.recent``)
PREFETCH_CHUNK = 64  # rows a prefetch reads before it looks whether it was cancelled

SERVED = COUNTS[:5]  # how a call's lookups were served (a record's counts, row_reader.COUNTS)
_STARTED = ThreadPoolExecutor(8, thread_name_prefix="engram-rows")  # reads issued with ``start``


class PendingRows:
    """A read in flight (``EngramRows.start``): ``wait()`` returns its ``out`` once written (of a
    ``prefetch``: the rows it read)."""

    def __init__(self, future: Future, out, record: dict | None = None, cancelled: threading.Event | None = None):
        self._future, self.out, self._record, self._cancelled = future, out, record, cancelled

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """A ``prefetch``: read no more of its rows than it has begun (a newer call's reads come first)."""
        if self._cancelled is not None:
            self._cancelled.set()

    @property
    def finished_at(self) -> float:
        """When a ``start``'s rows were written (``time.perf_counter``), once ``wait`` returned: what a
        schedule compares against its deadline (``measure/depth.py``)."""
        if self.out is None:
            raise EngramError("finished_at is the time a start's rows were written; a prefetch has none")
        return self._future.result(0)

    def wait(self, timeout: float | None = None):
        """The rows, once written (``out``); the read's error, if it failed, as it was raised."""
        began = time.perf_counter()
        try:
            result = self._future.result(timeout)
        finally:
            if self._record is not None:
                self._record["wait_us"] += (time.perf_counter() - began) * 1e6
        return result if self.out is None else self.out


class LayerRows:
    """The rows of one layer's table (``EngramRows[layer]``)."""

    def __init__(self, layer_id: int, reader: RowReader, verification: Verification, store=None, remote=None):
        self.layer_id, self._reader, self._verification = layer_id, reader, verification
        self._store, self._remote = store, remote
        self.table_rows, self.row_size = reader.table_rows, reader.row_size
        self.stored = dict(reader.attributes)  # element, scale, group_size, zero_point of the stored rows
        self._counts, self._lock = dict.fromkeys(READS, 0), threading.Lock()
        self._recent: deque[dict] = deque(maxlen=RECENT_CALLS)

    def width(self, form: str) -> int:
        """Values (``"f32"``, ``"bf16"``) or bytes (stored forms) per row in ``form``."""
        _check_form(form)
        return self._reader.width(form)

    def read(self, ids, out=None, *, form: str = "bf16", owned: tuple[int, int] | None = None, e8m0: str = "spec"):
        """The rows of ``ids`` (int32 or int64, any shape, C-contiguous; numpy or a CPU torch tensor) in
        ``form``, written into ``out`` (ids' shape + [width]: float32 for f32, bfloat16, or its bits as
        numpy uint16, for bf16, uint8 for stored forms; the last axis contiguous; pinned memory
        included) or a new numpy array; returns it. ``owned`` [start, stop): only these ids are read,
        the others give zero rows (a tensor-parallel rank's share). ``e8m0``: ``"spec"`` decodes scale
        bytes 0 and 255 as 2^-127 and NaN (the spec, SGLang), ``"vllm"`` as 0 and inf (vLLM's kernel)."""
        out = self._checked(ids, out, form, owned, e8m0)
        if self._remote is not None:  # a local read's ids are checked by the reader, before it reads
            self._check_range(ids)
        began, record = time.perf_counter(), _record()
        self._read(ids, out, form, owned, e8m0, record)
        record["wait_us"] = (time.perf_counter() - began) * 1e6  # the caller waited for all of it
        return out

    def start(
        self,
        ids,
        out=None,
        *,
        form: str = "bf16",
        owned: tuple[int, int] | None = None,
        e8m0: str = "spec",
        ready=None,
    ):
        """``read``, issued now and collected later: returns a ``PendingRows`` at once, after checking
        the arguments (ids out of range included); ``ids`` and ``out`` must not change until its
        ``wait`` returns. ``ready``: a callable the read calls first, for ids still being written when
        the read is issued (a GPU's copy to the host: its event's ``synchronize``); their range is then
        checked after it, and an id out of range is raised by ``wait``."""
        out = self._checked(ids, out, form, owned, e8m0)
        if ready is None:
            self._check_range(ids)
        record = _record()

        def read() -> float:
            if ready is not None:
                ready()
                self._check_range(ids)
            return self._read(ids, out, form, owned, e8m0, record)

        return PendingRows(_STARTED.submit(read), out, record)

    def prefetch(self, ids) -> PendingRows:
        """Read the rows of ``ids`` that a later call may need into a tiered table's cache, now, in the
        background, ``PREFETCH_CHUNK`` rows at a time; a later read that finds one there counts it as a
        candidate hit. Rows already in memory cost nothing, and so does a table held whole in memory or by
        shards (nothing to read ahead; the handle is done at once). Its ``wait`` returns the number of
        rows read; its ``cancel`` drops the chunks not begun (the next step's own reads come first)."""
        self._check_range(_checked_ids(ids))
        if not isinstance(self._store, TieredStore):
            done: Future = Future()
            done.set_result(0)
            return PendingRows(done, 0)
        if not self._store.cache_bytes:
            raise EngramError("prefetch reads rows into the tiered table's cache: open it with a cache_budget")
        with self._lock:
            self._counts["prefetches"] += 1
        flat, cancelled = _numpy(ids).reshape(-1), threading.Event()

        def warm() -> int:
            read = 0
            for start in range(0, len(flat), PREFETCH_CHUNK):
                if cancelled.is_set():
                    break
                read += self._store.warm(flat[start : start + PREFETCH_CHUNK])
            return read

        return PendingRows(_STARTED.submit(warm), None, cancelled=cancelled)

    def recent(self) -> list[dict]:
        """The last calls (up to ``RECENT_CALLS``, oldest first): per call its ``rows``, the time its caller
        was blocked on it (``wait_us``: all of a ``read``, what ``wait`` waited of a ``start``) and how its
        lookups (owned ids other than -1) were served: ``resident`` (a table held whole in memory), or, of a
        tiered table, ``hot``, ``cache``, ``candidate`` (a row a ``prefetch`` read, found the first time)
        and ``read`` (read for this call). Shards' rows count in none of them."""
        with self._lock:
            return [dict(record) for record in self._recent]

    def stats(self) -> dict[str, int]:
        """This layer's reads and rows (ids read, -1 and ids not owned included), and its store's counters (a
        tiered table's hot hits, cache hits and reads; shards' calls, requests, failovers)."""
        with self._lock:
            counts = dict(self._counts)
        if isinstance(self._store, TieredStore):
            counts.update(self._store.stats())
        if self._remote is not None:
            counts.update({f"remote_{name}": value for name, value in self._remote.stats(self.layer_id).items()})
        return counts

    def _checked(self, ids, out, form, owned, e8m0):
        _checked_ids(ids)
        _check_form(form)
        if e8m0 not in E8M0_READINGS:
            raise EngramError(f"e8m0 must be one of {', '.join(E8M0_READINGS)}, got {e8m0!r}")
        if owned is not None and (
            len(owned) != 2 or not all(isinstance(x, int | np.integer) for x in owned) or owned[0] > owned[1]
        ):
            raise EngramError(f"owned must be (start, stop) row ids with start <= stop, got {owned!r}")
        return self._reader.new_out(tuple(ids.shape), form) if out is None else out

    def _check_range(self, ids) -> None:
        flat = _numpy(ids).reshape(-1)
        if len(flat) and (flat.min() < -1 or flat.max() >= self.table_rows):
            bad = int(np.flatnonzero((flat < -1) | (flat >= self.table_rows))[0])
            raise EngramError(
                f"row id {int(flat[bad])} (at index {bad}) is outside the table's {self.table_rows} rows "
                f"(-1 is the engines' dead id; anything else must be a row)"
            )

    def _read(self, ids, out, form, owned, e8m0, record: dict) -> float:
        """Read, count, and return when the rows were written (``time.perf_counter``)."""
        self._verification.check()
        counts = np.zeros(len(COUNTS), np.uint64)
        if self._remote is not None:
            self._read_remote(ids, out, form, owned, e8m0)
        else:
            try:
                changed = self._reader.read(ids, out, form, owned, e8m0, counts=counts) == 2
            except EngramError:
                self._verification.check_files()  # a read that failed on a changed file: named by it
                raise
            if changed:
                self._verification.check_files()  # a guarded file changed during the read: refused
        record["rows"] = count = math.prod(ids.shape)
        record.update(zip(SERVED, counts[: len(SERVED)].tolist(), strict=True))
        with self._lock:
            self._counts["reads"] += 1
            self._counts["rows"] += count
            self._recent.append(record)
        return time.perf_counter()

    def _read_remote(self, ids, out, form, owned, e8m0) -> None:
        """Ids checked by the caller (``read``, ``start``): the reader sees only indices into the rows
        the shards sent."""
        self._remote.read(self.layer_id, _numpy(ids), out, self._reader, form, owned, e8m0)


class EngramRows(LayerMapping):
    """The rows of every layer of a folder (exported, compiled or calibrated): ``rows[layer].read(ids,
    out, form=...)``, or ``rows.read(layer, ids, ...)``.

    Options, by name, as ``EngramRuntime`` takes them (its docstring says what each does):
    ``table_memory`` (``"mmap"``, ``"populate"``, ``"hugepages"``, ``"tiered"``), ``cache_budget``,
    ``miss_reads``, ``hot_set_memory``, ``tables="ray://NAME"``, ``shard_deadline``, ``ray_address``, ``check_hashes``.
    Everything is checked at open (the folder, its files against the manifest, the shards' layout), so
    a bad configuration is refused in one line there, not at the first read.
    """

    def __init__(self, path: str | Path, **settings):
        options = _options(path, settings)
        self.path, self.options = Path(path), options
        checks = options.file_checks()
        self.manifest = manifest = read_manifest(self.path, checks)
        stores = tiered_stores(self.path, manifest, options)
        remote = remote_tables(self.path, manifest, options)
        self.config = manifest.config
        layers, guards = {}, []
        for layer_id, name in manifest.layers.items():
            model, info = read_openvino(self.path / name, checks)
            if info.layer_id != layer_id:
                raise EngramError(f"{self.path / name} holds layer {info.layer_id}; the manifest says {layer_id}")
            table = row_kernel.stored_table(split_stages(model)[0])
            if table is None:
                raise EngramError(f"{self.path / name}: its table is not one the row reader reads")
            if remote is not None:
                remote.add_layer(layer_id, table.layout)
                reader, store = RowReader(table.attributes, table.table_rows, None), None
            else:
                store = stores.get(layer_id) or table_store(options.table_memory)
                placed, tier = row_kernel.place(table, store)
                addresses = [part.ctypes.data for part in placed] + store.mapped_addresses()
                guard = guard_mappings(addresses, owner=(model, store))
                guards.append(guard)
                reader = RowReader(table.attributes, table.table_rows, placed, tier, guard, keep=(model, placed))
            layers[layer_id] = (reader, store)
        if remote is not None:
            remote.check()  # every shard answers, and serves what the layout says
        self.verification = Verification(checks, background=options.background_verification, guards=guards)
        self._layers = {
            layer_id: LayerRows(layer_id, reader, self.verification, store, remote)
            for layer_id, (reader, store) in layers.items()
        }

    @staticmethod
    def check(path: str | Path, **settings) -> None:
        """What opening would refuse first, without opening anything: the options, the folder and its
        manifest (files by size), a calibration where ``tiered`` needs one, the shards' name and layout.
        For a process that must refuse a bad setting now but may never read a row (an engine's front end)."""
        options = _options(path, settings)
        manifest = read_manifest(Path(path), FileChecks("size", tables_elsewhere=options.tables is not None))
        if options.table_memory == "tiered":
            for layer in manifest.layers:
                manifest.hot_set(layer)
        remote_tables(Path(path), manifest, options)

    def read(self, layer_id: int, ids, out=None, **options):
        """``self[layer_id].read(ids, out, **options)``."""
        return self[layer_id].read(ids, out, **options)

    def start(self, layer_id: int, ids, out=None, **options) -> PendingRows:
        """``self[layer_id].start(ids, out, **options)``."""
        return self[layer_id].start(ids, out, **options)

    def stats(self) -> dict[int, dict[str, int]]:
        """Layer id -> ``LayerRows.stats()``."""
        return {layer_id: layer.stats() for layer_id, layer in self._layers.items()}

    def __repr__(self) -> str:
        where = self.options.tables or f"table_memory={self.options.table_memory!r}"
        return f"EngramRows({str(self.path)!r}, {where}, layers={self.layer_ids})"


def _options(path, settings: dict) -> RuntimeOptions:
    unknown = sorted(set(settings) - set(ROW_OPTIONS))
    if unknown:
        raise EngramError(f"EngramRows takes {', '.join(ROW_OPTIONS)}; not {', '.join(unknown)}")
    if not Path(path).is_dir():
        raise EngramError(f"{path} is not a folder: EngramRows opens a folder that engram-export wrote")
    return RuntimeOptions(**settings)


def _record() -> dict:
    """A call's record (``LayerRows.recent``), filled by the read and by its caller's wait."""
    return {"rows": 0, "wait_us": 0.0, **dict.fromkeys(SERVED, 0)}


def _checked_ids(ids):
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        raise EngramError(f"ids must be a numpy array or a torch tensor, got {type(ids).__name__}")
    return ids


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise EngramError(f"form must be one of {', '.join(FORMS)}, got {form!r}")


def _numpy(ids) -> np.ndarray:
    """``ids`` as a numpy array (a CPU torch tensor's own memory)."""
    return ids if isinstance(ids, np.ndarray) else ids.numpy()
