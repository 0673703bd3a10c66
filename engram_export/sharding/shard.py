"""A table shard: the process (a Ray actor, ``cluster.serve_tables``) that serves the rows of its pieces
in their stored form (FP8 codes + E8M0 scales, u8/u4 codes + scales + zero points, f16/bf16/f32), the
bytes a client's row kernel decodes. It loads the folder's models as the runtime does (files checked
against the manifest) and refuses to start on a folder whose layers are not those the layout binds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engram_export.core.integrity import FileChecks
from engram_export.folders.manifest import read_manifest
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.row_kernel import stored_table
from engram_export.openvino.stages import split_stages
from engram_export.openvino.tiered import RowLayout, hot_set_files, pack_hot_rows, packed_parts, row_parts
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
        # layer -> (piece, its parts, the row they start at, layout, hot rows and their parts or None)
        self._pieces: dict[int, list[tuple[Piece, dict, int, RowLayout, tuple | None]]] = {}
        self._models = []  # the models own the mapped tables
        for layer in sorted({piece.layer for piece in self.plan.pieces}):
            if layer not in manifest.layers or layer_identity(self.folder, manifest, layer) != identities[str(layer)]:
                raise ValueError(f"{self.folder} does not hold the layer {layer} that the tables {name!r} serve")
            model, _ = read_openvino(self.folder / manifest.layers[layer], checks)
            table = stored_table(split_stages(model)[0])
            if table is None:
                raise ValueError(f"{self.folder}: layer {layer}'s table is not one the row kernel reads")
            self._models.append(model)
            parts, layout = table.arrays(), table.layout
            hot_set = _hot_set(self.folder, manifest, layer, layout) if table_memory == "tiered" else None
            for piece in (p for p in self.plan.pieces if p.layer == layer):
                entry: tuple
                if table_memory == "populate":
                    entry = (piece, _copy_rows(parts, layout, piece), piece.start, layout, None)
                else:
                    entry = (piece, parts, 0, layout, None if hot_set is None else _hot_rows(hot_set, layout, piece))
                self._pieces.setdefault(layer, []).append(entry)
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
        rows = np.asarray(rows)
        if rows.dtype != np.int64 or rows.ndim != 1 or not len(rows):
            raise ValueError(f"rows must be a non-empty 1-D int64 array, got {rows.dtype} {rows.shape}")
        if len(rows) > 1 and not np.all(rows[1:] > rows[:-1]):
            raise ValueError("rows must be sorted and unique")
        for piece, parts, offset, layout, hot in self._pieces.get(layer, ()):
            if piece.start <= rows[0] and rows[-1] < piece.stop:
                if hot is None:
                    return pack_hot_rows(parts, layout, rows - offset)
                return _tiered_rows(parts, layout, hot, rows)
        serves = ", ".join(f"layer {p.layer} rows {p.start}..{p.stop - 1}" for p in self.plan.pieces)
        raise ValueError(
            f"shard {self.plan.index} of {self.name!r} does not serve rows {int(rows[0])}..{int(rows[-1])} of layer "
            f"{layer} (it serves {serves})"
        )


def _copy_rows(parts: dict, layout, piece: Piece) -> dict[str, np.ndarray]:
    """The stored bytes of the piece's rows copied into memory, packed from its first row."""
    copies: dict[str, list[np.ndarray]] = {}
    for start in range(piece.start, piece.stop, _COPY_ROWS):
        rows = np.arange(start, min(start + _COPY_ROWS, piece.stop), dtype=np.int64)
        for part, data in pack_hot_rows(parts, layout, rows).items():
            copies.setdefault(part, []).append(data.reshape(-1))
    packed = {part: np.concatenate(chunks) for part, chunks in copies.items()}
    packed["codes"] = packed["codes"].reshape(piece.stop - piece.start, -1)
    return packed


def _hot_set(folder: Path, manifest, layer: int, layout: RowLayout) -> tuple[np.ndarray, dict]:
    """The layer's hot set as written by calibrate: (sorted rows, packed parts), read in place."""
    manifest.hot_set(layer)  # refuses a folder never calibrated
    names = hot_set_files(manifest.layers[layer])
    arrays = {part: np.load(folder / names[part], mmap_mode="r") for part in ("rows", *layout.part_sizes(0))}
    return np.asarray(arrays.pop("rows")), arrays


def _hot_rows(hot_set: tuple[np.ndarray, dict], layout: RowLayout, piece: Piece) -> tuple[np.ndarray, dict]:
    """The hot rows of ``piece`` and their stored bytes, copied into memory."""
    rows, parts = hot_set
    first, last = np.searchsorted(rows, [piece.start, piece.stop])
    parts = {**parts, "codes": parts["codes"].reshape(len(rows), layout.row_bytes)}
    return rows[first:last].copy(), pack_hot_rows(parts, layout, np.arange(first, last))


def _tiered_rows(parts: dict, layout: RowLayout, hot: tuple[np.ndarray, dict], rows: np.ndarray) -> dict:
    """``rows`` packed: the hot ones from memory, the others from the table file, merged in row order."""
    hot_rows, hot_parts = hot
    at = np.minimum(np.searchsorted(hot_rows, rows), max(len(hot_rows) - 1, 0))
    is_hot = hot_rows[at] == rows if len(hot_rows) else np.zeros(len(rows), bool)
    pieces = [
        row_parts(pack_hot_rows(source, layout, index), layout, len(index))
        for source, index in ((hot_parts, at[is_hot]), (parts, rows[~is_hot]))
    ]
    merged = {}
    for part in pieces[0]:
        merged[part] = np.empty((len(rows), pieces[0][part].shape[1]), np.uint8)
        merged[part][is_hot], merged[part][~is_hot] = pieces[0][part], pieces[1][part]
    return packed_parts(merged, layout)
