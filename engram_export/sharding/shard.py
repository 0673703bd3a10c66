"""A table shard: the process (a Ray actor, ``cluster.serve_tables``) that serves the rows of its pieces
in their stored form (FP8 codes + E8M0 scales, u8/u4 codes + scales + zero points, f16/bf16/f32), the
bytes a client's row kernel decodes. It loads the folder's models as the runtime does (files checked
against the manifest), refuses to start on a folder whose layers are not those the layout binds, and
reads every row through the row API's reader (``openvino/row_reader.py``), as a local table is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engram_export.core.integrity import FileChecks
from engram_export.folders.manifest import read_manifest
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.row_kernel import stored_table
from engram_export.openvino.row_reader import RowReader
from engram_export.openvino.stages import split_stages
from engram_export.openvino.tiered import RowLayout, hot_set, hot_set_files, open_tier, pack_hot_rows, packed_parts
from engram_export.sharding.layout import Piece, ShardPlan, layer_identity

__all__ = ["TableShard", "SHARD_MEMORY"]

SHARD_MEMORY = ("mmap", "populate", "tiered")
_COPY_ROWS = 1 << 20  # rows copied at once by populate (even: u4 zero points stay whole bytes)


class TableShard:
    """Serves ``rows(layer, rows)`` for the rows of its pieces. ``table_memory``: ``"mmap"`` (the table
    file's pages, read on demand; pages of other shards' rows are never touched), ``"populate"`` (its
    rows copied into memory at start) or ``"tiered"`` (a calibrated folder: the hot rows of its pieces
    copied into memory, the others read from the file's pages)."""

    def __init__(self, folder: str, name: str, plan: dict, identities: dict, table_memory: str):
        self.folder, self.name = Path(folder), name
        self.plan = ShardPlan.from_dict(plan)
        if table_memory not in SHARD_MEMORY:
            raise ValueError(f"table_memory must be one of {', '.join(SHARD_MEMORY)}, got {table_memory!r}")
        checks = FileChecks()  # the manifest's, then each layer's files (by size: the manifest checked them)
        manifest = read_manifest(self.folder, checks)
        # layer -> (piece, the reader of its rows, the row the reader's rows start at); its stored layout
        self._pieces: dict[int, list[tuple[Piece, RowReader, int]]] = {}
        self._layouts: dict[int, RowLayout] = {}
        self._keep: list = []  # the models own the mapped tables; the tiers read them
        for layer in sorted({piece.layer for piece in self.plan.pieces}):
            if layer not in manifest.layers or layer_identity(self.folder, manifest, layer) != identities[str(layer)]:
                raise ValueError(f"{self.folder} does not hold the layer {layer} that the tables {name!r} serve")
            model, _ = read_openvino(self.folder / manifest.layers[layer], checks)
            table = stored_table(split_stages(model)[0])
            if table is None:
                raise ValueError(f"{self.folder}: layer {layer}'s table is not one the row kernel reads")
            parts, layout = table.arrays(), table.layout
            pieces = [p for p in self.plan.pieces if p.layer == layer]
            self._layouts[layer] = layout
            if table_memory == "populate":
                readers = [(_copy_rows(parts, table.attributes, layout, piece), piece.start) for piece in pieces]
            else:
                tier = 0
                if table_memory == "tiered":  # the hot rows of its pieces resident, the rest read from the file
                    hot = _hot_rows(self.folder, manifest, layer, layout, pieces)
                    opened = open_tier(list(parts.values()), layout, hot, 0)
                    self._keep.append(opened)
                    tier = opened.id
                whole = RowReader(table.attributes, table.table_rows, list(parts.values()), tier, keep=(model, parts))
                readers = [(whole, 0)] * len(pieces)
            self._pieces[layer] = [
                (piece, reader, offset) for piece, (reader, offset) in zip(pieces, readers, strict=True)
            ]
            self._keep.append(model)
        self._identity = {
            "name": name,
            "index": self.plan.index,
            "pieces": [piece.to_dict() for piece in self.plan.pieces],
            "identities": {str(layer): identities[str(layer)] for layer in self._pieces},
        }

    def identity(self) -> dict:
        """What this shard serves, and where it runs (node, process)."""
        import ray

        return {**self._identity, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def rows(self, layer: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The stored bytes of ``rows`` (int64, sorted, unique, inside one piece of layer ``layer``)
        packed in their order: part -> u8 array (``tiered.pack_hot_rows``)."""
        reader, local = self._reader_of(layer, rows)
        return _stored(reader, local, self._layouts[layer])

    def serve(self, request: bytes | None) -> bytes | None:
        """The rows of one request of the client's compiled graph (``fast_path.FastPath``): int64 bytes
        ``[layer, rows...]`` (as ``rows``) in, their packed form out (``RowReader`` form ``"packed"``:
        codes, scales, zero points a byte a group, row after row); ``None`` for none. Bytes both ways: Ray
        passes them without pickling, about 0.3 ms less a call than a tuple and a numpy array on the test
        host (docs/sharding.md)."""
        if request is None:
            return None
        header = np.frombuffer(request, np.int64)
        layer = int(header[0])
        reader, local = self._reader_of(layer, header[1:])
        packed = reader.new_out((len(local),), "packed")
        reader.read(local, packed, "packed")
        return packed.tobytes()

    def _reader_of(self, layer: int, rows: np.ndarray) -> tuple[RowReader, np.ndarray]:
        """The reader of the piece that holds ``rows`` and the rows as its reader numbers them; refuses rows
        not int64, sorted and unique inside one piece of layer ``layer``."""
        rows = np.asarray(rows)
        if rows.dtype != np.int64 or rows.ndim != 1 or not len(rows):
            raise ValueError(f"rows must be a non-empty 1-D int64 array, got {rows.dtype} {rows.shape}")
        if len(rows) > 1 and not np.all(rows[1:] > rows[:-1]):
            raise ValueError("rows must be sorted and unique")
        for piece, reader, offset in self._pieces.get(layer, ()):
            if piece.start <= rows[0] and rows[-1] < piece.stop:
                return reader, rows - offset
        serves = ", ".join(f"layer {p.layer} rows {p.start}..{p.stop - 1}" for p in self.plan.pieces)
        raise ValueError(
            f"shard {self.plan.index} of {self.name!r} does not serve rows {int(rows[0])}..{int(rows[-1])} of layer "
            f"{layer} (it serves {serves})"
        )


def _stored(reader: RowReader, rows: np.ndarray, layout: RowLayout) -> dict[str, np.ndarray]:
    """The stored bytes of ``rows`` read by ``reader``, packed in their order (``tiered.pack_hot_rows``'s
    form: what a client's reader takes as the rows' source)."""
    packed = reader.new_out((len(rows),), "packed")  # codes, scales, zero points a byte a group
    reader.read(rows, packed, "packed")
    split = np.cumsum([layout.row_bytes, layout.scale_bytes])
    parts = dict(zip(("codes", "scales", "zero_points"), np.split(packed, split, axis=1), strict=True))
    return packed_parts({part: data for part, data in parts.items() if data.shape[1]}, layout)


def _copy_rows(parts: dict, attributes: dict, layout: RowLayout, piece: Piece) -> RowReader:
    """The reader of the piece's rows copied into memory (its row 0 is the piece's first row)."""
    copies: dict[str, list[np.ndarray]] = {}
    for start in range(piece.start, piece.stop, _COPY_ROWS):
        rows = np.arange(start, min(start + _COPY_ROWS, piece.stop), dtype=np.int64)
        for part, data in pack_hot_rows(parts, layout, rows).items():
            copies.setdefault(part, []).append(data.reshape(-1))
    packed = [np.concatenate(copies[part]) for part in ("codes", "scales", "zero_points") if part in copies]
    return RowReader(attributes, piece.stop - piece.start, packed, keep=packed)


def _hot_rows(folder: Path, manifest, layer: int, layout: RowLayout, pieces: list[Piece]):
    """The hot set (``tiered.hot_set``) of the calibrated layer's hot rows inside ``pieces``, copied into
    memory."""
    manifest.hot_set(layer)  # refuses a folder never calibrated
    names = hot_set_files(manifest.layers[layer])
    arrays = {part: np.load(folder / names[part], mmap_mode="r") for part in ("rows", *layout.part_sizes(0))}
    rows = np.asarray(arrays.pop("rows"))
    inside = np.zeros(len(rows), bool)
    for piece in pieces:
        first, last = np.searchsorted(rows, [piece.start, piece.stop])
        inside[first:last] = True
    arrays["codes"] = arrays["codes"].reshape(len(rows), layout.row_bytes)
    return hot_set(rows[inside], pack_hot_rows(arrays, layout, np.flatnonzero(inside)), layout)
