"""Which rows each shard serves: contiguous ranges of the layers' tables, cut at hash-head boundaries,
balanced by bytes, and what binds a shard to the table it serves.

Every (n-gram order, head) of a layer owns a contiguous block of its table's rows (its prime's worth,
``hashing.primes``), so a cut between heads never splits one hash's rows: each lookup column of a call
goes to exactly one shard. A shard holds one or more pieces, a piece being a row range of one layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from engram_export.core.errors import EngramError
from engram_export.folders.manifest import Manifest, model_files

__all__ = ["Piece", "ShardPlan", "plan_shards", "layer_identity"]


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of layer ``layer``'s table."""

    layer: int
    start: int
    stop: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    index: int
    pieces: tuple[Piece, ...]
    nbytes: int  # stored bytes of its rows

    def to_dict(self) -> dict:
        return {"index": self.index, "pieces": [p.to_dict() for p in self.pieces], "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, data: dict) -> ShardPlan:
        return cls(int(data["index"]), tuple(Piece(**p) for p in data["pieces"]), int(data["nbytes"]))


def plan_shards(head_rows: dict[int, list[int]], row_bytes: dict[int, float], shards: int) -> list[ShardPlan]:
    """``shards`` shards over the tables whose heads hold ``head_rows[layer]`` rows each (in table order),
    ``row_bytes[layer]`` bytes a row: the cut after shard k is the head boundary nearest to k/shards of
    all the bytes (no shard empty)."""
    units = []  # (layer, first row, rows, bytes) of every head, layers in order
    for layer in sorted(head_rows):
        start = 0
        for rows in head_rows[layer]:
            units.append((layer, start, rows, rows * row_bytes[layer]))
            start += rows
    if not 1 <= shards <= len(units):
        raise EngramError(f"shards must be 1 to {len(units)} (one hash head each at most), got {shards}")
    ends = np.cumsum([unit[3] for unit in units])
    cuts, previous = [], 0
    for k in range(1, shards):
        nearest = int(np.argmin(np.abs(ends - ends[-1] * k / shards))) + 1
        nearest = min(max(nearest, previous + 1), len(units) - (shards - k))  # every shard keeps a head
        cuts.append(nearest)
        previous = nearest
    plans = []
    for index, (first, last) in enumerate(zip([0, *cuts], [*cuts, len(units)], strict=True)):
        pieces: list[Piece] = []
        for layer, start, rows, _ in units[first:last]:
            if pieces and pieces[-1].layer == layer and pieces[-1].stop == start:
                pieces[-1] = Piece(layer, pieces[-1].start, start + rows)
            else:
                pieces.append(Piece(layer, start, start + rows))
        nbytes = int(round(sum(unit[3] for unit in units[first:last])))
        plans.append(ShardPlan(index, tuple(pieces), nbytes))
    return plans


def layer_identity(folder: Path, manifest: Manifest, layer_id: int) -> str:
    """A fingerprint of what a shard of layer ``layer_id`` must serve: the layer id, the config and the
    recorded fingerprints of every file its model reads (the table among them)."""
    name = manifest.layers[layer_id]
    files = {file: manifest.files.get(file) for file in model_files(folder, name)}
    record = {"layer": layer_id, "config": manifest.config.to_dict(), "files": files}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
