"""Rows of one table read by the extension's row reader (``engram_rows_read`` in extension/gather_rows.cpp),
the code ``EngramGatherRows`` runs: for callers that want rows by id, not a lookup stage's embeddings.

A ``RowReader`` holds what the reader needs of one table: its stored layout (a ``row_kernel.StoredTable``'s
attributes), where its parts are in memory (as a ``table_store.TableStore`` placed them), the tier that
finds rows not in memory, and the file guard checked after each read. ``read`` writes the rows of any
array of ids into the caller's buffer (numpy, or a CPU torch tensor, pinned included: duck typed, so
this module never imports torch) in one of ``FORMS``. The request struct is copied here as ctypes
(``_Request``); a library whose layout version or struct size differs is refused when it is opened.
"""

from __future__ import annotations

import ctypes
import math
import threading
from functools import cache

import numpy as np

from engram_export.core.errors import EngramError
from engram_export.openvino.extension import check_struct, library_path

__all__ = ["RowReader", "FORMS", "DECODED_FORMS", "E8M0_READINGS", "COUNTS"]

# what a read writes per row: decoded values, or the stored bytes (all parts packed, or one part)
FORMS = ("f32", "bf16", "packed", "codes", "scales")
DECODED_FORMS = ("f32", "bf16")
# how E8M0 scale bytes 0 and 255 decode: as the spec and SGLang (2^-127, NaN), or as vLLM's kernel (0, inf)
E8M0_READINGS = ("spec", "vllm")

# A read's own counts (``read(..., counts=)``; ``EngramCallCount`` in extension/table_tier.hpp), in this
# order: lookups (owned ids other than -1) of a table held whole (``mmap``, ``populate``, ``hugepages``:
# every lookup, under "resident", the tier's entries zero), and of a tiered one: hot, cache, candidate
# (a row a warm read, found for the first time) and read (its row read in this call), so that resident +
# hot + cache + candidate + read == the lookups; then the distinct rows read, those of them found in the
# page cache, and the nanoseconds waited for the others.
COUNTS = ("resident", "hot", "cache", "candidate", "read", "rows_read", "page_cache_rows", "read_ns")

_ELEMENTS = ("f32", "f16", "bf16", "u8", "u4", "e4m3")
_SCALES = ("none", "f16", "f32", "e8m0")
_ZERO_POINTS = ("none", "u8", "u4")
_VLLM_E8M0 = 4  # the request's scale code for E8M0 read as vLLM reads it
_OWN_ALL = (-(1 << 62), 1 << 62)

# The layout version of ``EngramRowsRequest`` that ``_Request`` copies (``ENGRAM_ROWS_ABI_VERSION`` in
# extension/gather_rows.hpp): raised there and here together whenever the struct changes.
ROWS_ABI_VERSION = 2


class _Request(ctypes.Structure):
    """``EngramRowsRequest`` of extension/gather_rows.hpp, field for field."""

    _fields_ = [
        ("element", ctypes.c_uint32),
        ("scale", ctypes.c_uint32),
        ("zero_point", ctypes.c_uint32),
        ("form", ctypes.c_uint32),
        ("row_size", ctypes.c_uint64),
        ("group_size", ctypes.c_uint64),
        ("table_rows", ctypes.c_uint64),
        ("tier", ctypes.c_int64),
        ("parts", ctypes.c_void_p * 3),
        ("ids", ctypes.c_void_p),
        ("ids_bytes", ctypes.c_uint64),
        ("count", ctypes.c_uint64),
        ("owned", ctypes.c_int64 * 2),
        ("out", ctypes.c_void_p),
        ("out_inner", ctypes.c_uint64),
        ("out_strides", ctypes.c_int64 * 2),
        ("guards", ctypes.c_void_p),
        ("guard_count", ctypes.c_uint64),
        ("counts", ctypes.c_void_p),
    ]


@cache
def _library():
    path = str(library_path())
    library = ctypes.CDLL(path)  # the library OpenVINO loaded: one registry of tiers and guards
    symbols = ("engram_rows_abi_version", "engram_rows_request_size")
    expected = (ROWS_ABI_VERSION, ctypes.sizeof(_Request))
    check_struct(library, path, symbols, expected, "row reader", "openvino/row_reader.py")
    library.engram_rows_read.argtypes = [ctypes.POINTER(_Request), ctypes.c_char_p, ctypes.c_size_t]
    library.engram_rows_read.restype = ctypes.c_int
    return library


_FORM_CODES = {form: code for code, form in enumerate(FORMS)}
_OUT_DTYPES = {"f32": "float32", "bf16": "bfloat16", "packed": "uint8", "codes": "uint8", "scales": "uint8"}
_NUMPY_OUT = {"f32": np.float32, "bf16": np.uint16, "packed": np.uint8, "codes": np.uint8, "scales": np.uint8}
_ITEMSIZES = {"float32": 4, "bfloat16": 2, "uint8": 1}

# numpy dtypes by the names the reader uses (numpy has no bf16: its bits, uint16)
_NUMPY_DTYPES = {
    np.dtype(name): alias
    for name, alias in (("int64", "int64"), ("int32", "int32"), ("float32", "float32"), ("uint16", "bfloat16"))
} | {np.dtype(np.uint8): "uint8"}


class _Array:
    """What the reader needs of a numpy array or a torch tensor: address, dtype name, shape, byte
    strides, and whether it is C-contiguous."""

    __slots__ = ("address", "dtype", "shape", "strides", "contiguous")

    def __init__(self, value, what: str):
        if type(value) is np.ndarray or isinstance(value, np.ndarray):
            self.address = value.__array_interface__["data"][0]
            self.dtype = _NUMPY_DTYPES.get(value.dtype) or value.dtype.name
            self.shape, self.strides, self.contiguous = value.shape, value.strides, value.flags.c_contiguous
            return
        if type(value).__module__.partition(".")[0] != "torch" or not hasattr(value, "data_ptr"):
            raise EngramError(f"{what} must be a numpy array or a torch tensor, got {type(value).__name__}")
        if value.device.type != "cpu":
            raise EngramError(f"{what} must be in host memory (a CPU tensor, pinned or not), got device {value.device}")
        itemsize = value.element_size()
        self.address, self.dtype = value.data_ptr(), str(value.dtype).removeprefix("torch.")
        self.shape, self.contiguous = tuple(value.shape), value.is_contiguous()
        self.strides = tuple(stride * itemsize for stride in value.stride())


def _rows_at(shape: tuple, strides: tuple) -> tuple[int, int, int]:
    """(inner, outer stride, inner stride) in bytes such that row i of an array of rows with leading
    ``shape`` and ``strides`` is at (i // inner) * outer stride + (i % inner) * inner stride: the last
    leading axis has any stride, the ones before it must be contiguous over each other."""
    if not shape:
        return 1, 0, 0
    for axis in range(len(shape) - 3, -1, -1):
        if shape[axis] > 1 and strides[axis] != strides[axis + 1] * shape[axis + 1]:
            raise EngramError(f"out: its rows are not at regular strides ({strides}); pass a contiguous array")
    return max(shape[-1], 1), strides[-2] if len(shape) > 1 else 0, strides[-1]


class RowReader:
    """The rows of one table: ``read(ids, out, form)``. ``attributes``: a ``row_kernel.StoredTable``'s;
    ``parts``: its stored parts in memory (codes [R, row bytes], scales and zero points flat), or None
    where ``tier`` finds every row; ``guard``: the ``FileGuard`` of the files under them, or None;
    ``keep``: what keeps that memory alive."""

    def __init__(self, attributes: dict, table_rows: int, parts, tier: int = 0, guard=None, keep=None):
        self.attributes, self.table_rows = dict(attributes), int(table_rows)
        element, scale, zero = attributes["element"], attributes["scale"], attributes["zero_point"]
        self.row_size, self.groups = attributes["row_size"], attributes["row_size"] // attributes["group_size"]
        self.row_bytes = self.row_size * {"f32": 4, "f16": 2, "bf16": 2, "u4": 1, "u8": 1, "e4m3": 1}[element]
        if element == "u4":
            self.row_bytes //= 2
        self.scale_bytes = self.groups * {"none": 0, "f16": 2, "f32": 4, "e8m0": 1}[scale]
        self.zero_bytes = self.groups if zero != "none" else 0  # the packed form gives a byte a group
        self._keep, self.guard = keep, guard
        template = _Request(
            element=_ELEMENTS.index(element),
            scale=_SCALES.index(scale),
            zero_point=_ZERO_POINTS.index(zero),
            row_size=self.row_size,
            group_size=attributes["group_size"],
            table_rows=self.table_rows,
            tier=tier,
        )
        if parts is not None:
            for index, part in enumerate(parts):
                template.parts[index] = part.__array_interface__["data"][0]
        slots = guard.slot_indices() if guard is not None else None
        if slots is not None and len(slots):
            template.guards, template.guard_count = ctypes.addressof(slots), len(slots)
        self._guard_slots = slots
        self._template = bytes(template)
        self._local = threading.local()  # each thread's request and error buffer
        packed = self.row_bytes + self.scale_bytes + self.zero_bytes
        self._widths = {"f32": self.row_size, "bf16": self.row_size, "packed": packed}
        self._widths |= {"codes": self.row_bytes, "scales": self.scale_bytes}
        _library()

    def width(self, form: str) -> int:
        """Values (decoded forms) or bytes (stored forms) per row of ``form``."""
        return self._widths[form]

    def new_out(self, shape: tuple, form: str) -> np.ndarray:
        """A numpy array for the rows of ids of ``shape`` in ``form`` (bf16 as its bits, uint16)."""
        return np.empty((*shape, self._widths[form]), _NUMPY_OUT[form])

    def read(
        self,
        ids,
        out,
        form: str,
        owned: tuple[int, int] | None = None,
        e8m0: str = "spec",
        source=None,
        counts: np.ndarray | None = None,
    ) -> int:
        """Write the rows of ``ids`` (int32 or int64, C-contiguous, any shape) into ``out`` (ids' shape +
        [width], the last axis contiguous, rows at regular strides) in ``form``: ids in ``owned``
        [start, stop) (default every row) are read, -1 and any other id give zero rows; an id outside
        [-1, table rows) is refused before any row is read. Returns 0, or 2 when a guarded file changed
        during the read (the caller refuses the call, naming it from the guard). ``source``: (parts, rows),
        other rows of this table's layout to read from instead (the rows shards sent, packed as the
        table's parts: ``tiered.pack_hot_rows``). ``counts``: a uint64 array of ``len(COUNTS)`` that gets
        this call's own counts (``COUNTS``; the tier's counters count every call's together)."""
        ids_array, out_array = _Array(ids, "ids"), _Array(out, "out")
        if ids_array.dtype not in ("int64", "int32"):
            raise EngramError(f"ids must be int32 or int64, got {ids_array.dtype}")
        if not ids_array.contiguous:
            raise EngramError(f"ids must be C-contiguous, got strides {ids_array.strides}")
        width, dtype = self._widths[form], _OUT_DTYPES[form]
        if out_array.shape != (*ids_array.shape, width) or out_array.dtype != dtype:
            raise EngramError(
                f"out must be {dtype} {[*ids_array.shape, width]} for {form} rows of ids {list(ids_array.shape)}, "
                f"got {out_array.dtype} {list(out_array.shape)}"
            )
        if width > 1 and out_array.strides[-1] != _ITEMSIZES[dtype]:
            raise EngramError(f"out: the values of a row must be contiguous, got strides {out_array.strides}")
        inner, outer_stride, inner_stride = _rows_at(out_array.shape[:-1], out_array.strides[:-1])
        local = self._local
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = _Request()
            local.address, local.error = ctypes.addressof(request), ctypes.create_string_buffer(512)
        ctypes.memmove(local.address, self._template, len(self._template))
        request.form = _FORM_CODES[form]
        if source is not None:
            parts, request.table_rows = source
            for index, part in enumerate(parts):
                request.parts[index] = part.__array_interface__["data"][0]
        if e8m0 == "vllm" and form in DECODED_FORMS and request.scale == _SCALES.index("e8m0"):
            request.scale = _VLLM_E8M0
        request.ids, request.ids_bytes = ids_array.address, 4 if ids_array.dtype == "int32" else 8
        request.count = math.prod(ids_array.shape)
        request.owned[0], request.owned[1] = owned if owned is not None else _OWN_ALL
        request.out, request.out_inner = out_array.address, inner
        request.out_strides[0], request.out_strides[1] = outer_stride, inner_stride
        if counts is not None:
            if not isinstance(counts, np.ndarray) or counts.dtype != np.uint64 or counts.shape != (len(COUNTS),):
                raise EngramError(f"counts must be a uint64 numpy array of {len(COUNTS)} ({', '.join(COUNTS)})")
            if not counts.flags.c_contiguous or not counts.flags.writeable:
                raise EngramError("counts must be a contiguous, writeable array")
            request.counts = counts.ctypes.data
        done = _library().engram_rows_read(request, local.error, 512)
        if done == 1:
            raise EngramError(local.error.value.decode())
        return done
