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
from engram_export.openvino.tiered import pack_hot_rows
from engram_export.sharding.layout import Piece, ShardPlan, layer_identity

__all__ = ["TableShard", "SHARD_MEMORY"]

SHARD_MEMORY = ("mmap", "populate")
_COPY_ROWS = 1 << 20  # rows copied at once by populate (even: u4 zero points stay whole bytes)


class TableShard:
    """Serves ``rows(layer, rows)`` for the rows of its pieces. ``table_memory``: ``"mmap"`` (the table
    file's pages, read on demand; pages of other shards' rows are never touched) or ``"populate"`` (its
    rows copied into memory at start)."""

    def __init__(self, folder: str, name: str, plan: dict, identities: dict, table_memory: str):
        self.folder, self.name = Path(folder), name
        self.plan = ShardPlan.from_dict(plan)
        if table_memory not in SHARD_MEMORY:
            raise ValueError(f"table_memory must be one of {', '.join(SHARD_MEMORY)}, got {table_memory!r}")
        manifest = read_manifest(self.folder)
        self._pieces: dict[int, list[tuple[Piece, dict, int, object]]] = {}  # layer -> (piece, parts, offset, layout)
        self._models = []  # the models own the mapped tables
        for layer in sorted({piece.layer for piece in self.plan.pieces}):
            if layer not in manifest.layers or layer_identity(self.folder, manifest, layer) != identities[str(layer)]:
                raise ValueError(f"{self.folder} does not hold the layer {layer} that the tables {name!r} serve")
            model, _ = read_openvino(self.folder / manifest.layers[layer], FileChecks("size"))
            table = stored_table(split_stages(model)[0])
            if table is None:
                raise ValueError(f"{self.folder}: layer {layer}'s table is not one the row kernel reads")
            self._models.append(model)
            parts, layout = table.arrays(), table.layout
            for piece in (p for p in self.plan.pieces if p.layer == layer):
                if table_memory == "populate":
                    entry = (piece, _copy_rows(parts, layout, piece), piece.start, layout)
                else:
                    entry = (piece, parts, 0, layout)
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
        for piece, parts, offset, layout in self._pieces.get(layer, ()):
            if piece.start <= rows[0] and rows[-1] < piece.stop:
                return pack_hot_rows(parts, layout, rows - offset)
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
