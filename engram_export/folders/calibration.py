"""``engram-export calibrate``: choose each layer's hot table rows on real text and write a folder that
serves them from memory (``table_memory="tiered"``, ``openvino/tiered.py``).

The text is tokenized with the model's own tokenizer and hashed exactly as the model hashes; each
layer's row lookups are counted (memory grows with the distinct rows the text reaches, never with the
table). The hot set is the rows that earn the most lookups per stored byte, chosen across every layer
together, up to the budget. How well such a set serves text it has not seen is measured first: a set
chosen from the first nine tenths of the text serves a share of the last tenth's lookups, reported per
layer and recorded in the manifest. The set written is then chosen from all of the text (the manifest
says so: ``chosen_from``), with the budget and a SHA-256 of the tokens. The new folder holds hard links
to the input's files (never written), each layer's hot set (packed rows in their stored form) and a
manifest that binds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.core.fileio import DEFAULT_WRITE, WriteOptions, check_output_folder, staged_folder
from engram_export.core.integrity import FileChecks
from engram_export.core.resources import parse_size, require_disk
from engram_export.core.text import token_pieces
from engram_export.folders.manifest import read_manifest, write_manifest
from engram_export.models.table_rows import hashing_of, table_rows
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.row_kernel import StoredTable, stored_table
from engram_export.openvino.stages import split_stages
from engram_export.openvino.tiered import hot_set_files, pack_hot_rows

__all__ = ["calibrate", "describe", "row_counts", "all_orders", "choose_hot_rows", "hit_rate", "HELD_OUT"]

HELD_OUT = 0.1  # the last tenth of the text (by bytes): the hit rate is measured there
_WINDOW = 1 << 16  # tokens hashed at once
_BATCH = 1 << 24  # row lookups sorted at once (RowCounter)
_PACK_ROWS = 1 << 20  # hot rows packed and written at once (an even number: u4 zero points stay whole bytes)


class LayerRows:
    """A layer's table rows [T, C] of consecutive pieces of one token sequence: each piece is hashed with
    the sequence's last ``max_ngram_size - 1`` tokens before it, so the rows are those of the whole
    sequence hashed at once. ``start()`` begins a new sequence (its first tokens see pads)."""

    def __init__(self, hashing, config, layer_id: int):
        self.hashing, self.config, self.layer_id = hashing, config, layer_id
        self.table_rows = sum(hashing.primes(layer_id))
        heads = config.n_head_per_ngram
        self.orders = {2 + first // heads: slice(first, first + heads) for first in range(0, config.num_heads, heads)}
        self._context = np.zeros(0, np.int64)

    def start(self) -> None:
        self._context = np.zeros(0, np.int64)

    def __call__(self, ids: np.ndarray):
        """Yields the rows of ``ids``, ``_WINDOW`` tokens at a time."""
        for begin in range(0, len(ids), _WINDOW):
            window = np.concatenate([self._context, ids[begin : begin + _WINDOW]])
            yield table_rows(self.hashing, window[None], None, self.layer_id)[0, len(self._context) :]
            self._context = window[max(0, len(window) - (self.config.max_ngram_size - 1)) :]


class RowCounter:
    """Lookups per row of row ids added in any order. Each batch of ``_BATCH`` ids is sorted and
    run-length counted into (row, count) keys packed in a uint64 (row high, count low); sorted runs of
    keys are merged pairwise as they reach the size of the run before them (a two-run stable sort is a
    linear merge): O(n log n) work, memory within about twice the distinct rows plus one batch. Once the
    keys would take more memory than a count per table row (4 bytes a row: half the rows reached), the
    counts move into such an array and each batch is added to it: never more memory than the keys."""

    def __init__(self, table_rows: int):
        self.table_rows = table_rows
        self._dense: np.ndarray | None = None  # uint32 counts of every row, once the keys outgrow it
        row_bits = max(1, (table_rows - 1).bit_length())
        self._shift = np.uint64(64 - row_bits)
        self._most = (1 << (64 - row_bits)) - 1  # lookups of one row that the keys can count
        self._batch = np.empty(0, np.uint32 if row_bits <= 32 else np.uint64)  # a 32-bit sort: about 1.6x faster
        self._filled = 0
        self._runs: list[np.ndarray] = []
        self.lookups = 0

    def add(self, rows: np.ndarray) -> None:
        self.lookups += rows.size
        if self.lookups > self._most:
            raise EngramError(f"{self.lookups:,} lookups are more than one count can hold ({self._most:,})")
        if not len(self._batch):
            self._batch = np.empty(_BATCH, self._batch.dtype)  # one buffer, reused: no page faults per batch
        flat = rows.reshape(-1)
        while len(flat):
            take = min(len(flat), _BATCH - self._filled)
            self._batch[self._filled : self._filled + take] = flat[:take]
            self._filled, flat = self._filled + take, flat[take:]
            if self._filled == _BATCH:
                self._flush()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, counts), rows sorted, both int64."""
        self._flush()
        self._batch = np.empty(0, self._batch.dtype)
        if self._dense is not None:
            rows = np.flatnonzero(self._dense)
            return rows.astype(np.int64), self._dense[rows].astype(np.int64)
        while len(self._runs) > 1:
            self._runs.append(self._merge(self._runs.pop(-2), self._runs.pop()))
        keys = self._runs[0] if self._runs else np.zeros(0, np.uint64)
        return (keys >> self._shift).astype(np.int64), (keys & np.uint64(self._most)).astype(np.int64)

    def _flush(self) -> None:
        if not self._filled:
            return
        rows = self._batch[: self._filled]
        self._filled = 0
        rows.sort()
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        counts = np.diff(np.r_[starts, len(rows)])
        if self._dense is not None:
            unique = rows[starts]
            summed = self._dense[unique] + counts.astype(np.uint64)
            if summed.max() > np.iinfo(self._dense.dtype).max:  # a row past 2^32 lookups: wider counts
                self._dense = self._dense.astype(np.uint64)
            self._dense[unique] = summed
            return
        self._runs.append(rows[starts].astype(np.uint64) << self._shift | counts.astype(np.uint64))
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            self._runs.append(self._merge(self._runs.pop(-2), self._runs.pop()))
        if 2 * sum(len(run) for run in self._runs) >= self.table_rows:
            self._dense = np.zeros(self.table_rows, np.uint32)
            for run in self._runs:
                self._dense[(run >> self._shift).astype(np.int64)] += (run & np.uint64(self._most)).astype(np.uint32)
            self._runs = []

    def _merge(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Two runs as one: a row in both (adjacent once sorted) keeps one key, its counts summed."""
        keys = np.concatenate([first, second])
        keys.sort(kind="stable")  # timsort finds the two sorted runs and merges them
        rows = keys >> self._shift
        twice = np.flatnonzero(rows[1:] == rows[:-1])
        keys[twice] += keys[twice + 1] & np.uint64(self._most)
        keep = np.ones(len(keys), bool)
        keep[twice + 1] = False
        return keys[keep]


def row_counts(
    hashing, config, layer_id: int, stream: np.ndarray, counter=None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per n-gram order n: (rows, lookup counts) of every row the token ``stream`` (one sequence)
    reaches, rows sorted. ``counter``: a ``progress.steps`` counter advanced by the tokens hashed."""
    layer = LayerRows(hashing, config, layer_id)
    counters = {order: RowCounter(layer.table_rows) for order in layer.orders}
    for rows in layer(stream):
        for order, columns in layer.orders.items():
            counters[order].add(rows[:, columns])
        if counter is not None:
            counter.advance(len(rows))
    return {order: counts.result() for order, counts in counters.items()}


_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _merge_all(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, counts) of several such pairs, a row's counts summed."""
    rows = np.concatenate([r for r, _ in parts])
    if not len(rows):
        return _EMPTY
    unique, inverse = np.unique(rows, return_inverse=True)
    return unique, np.bincount(inverse, weights=np.concatenate([c for _, c in parts]), minlength=len(unique)).astype(
        np.int64
    )


def hit_rate(hot: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> float:
    """The share of the lookups (``rows`` with their ``counts``) that fall on the rows ``hot``."""
    hot = np.sort(hot)
    if not len(hot):
        return 0.0
    found = hot[np.minimum(np.searchsorted(hot, rows), len(hot) - 1)] == rows
    return float(counts[found].sum() / max(1, counts.sum()))


def all_orders(counts: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``row_counts``'s per-order counts as one (rows, counts) pair."""
    return _merge_all([_EMPTY, *counts.values()])


@dataclasses.dataclass
class _Layer:
    file: str
    table: StoredTable
    calibration: tuple[np.ndarray, np.ndarray]  # (rows, lookup counts) of the calibration text
    held_out: tuple[np.ndarray, np.ndarray]


def choose_hot_rows(counts: dict[int, tuple[np.ndarray, np.ndarray]], row_bytes: dict[int, float], budget: int):
    """Layer -> the sorted rows that earn the most lookups per byte across every layer, up to ``budget``
    bytes (ties: the lower layer id, then the lower row)."""
    layers = sorted(counts)
    most = int(budget // min(row_bytes.values())) + 1  # no more rows than this can fit
    counts = {layer: _leading(*counts[layer], most) for layer in layers}
    per_byte = np.concatenate([counts[layer][1] / row_bytes[layer] for layer in layers])
    which = np.concatenate([np.full(len(counts[layer][0]), index) for index, layer in enumerate(layers)])
    rows = np.concatenate([counts[layer][0] for layer in layers])
    order = np.lexsort((rows, which, -per_byte))
    sizes = np.array([row_bytes[layer] for layer in layers])[which[order]]
    taken = order[: int(np.searchsorted(np.cumsum(sizes), budget, side="right"))]
    return {layer: np.sort(rows[taken[which[taken] == index]]) for index, layer in enumerate(layers)}


def _leading(rows: np.ndarray, counts: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``most`` of (rows, counts) (rows sorted) in the order of the choice: more lookups
    first, then the lower row. The rows of a layer share one size, so the choice across layers takes a
    prefix of each layer's order: the rest can be dropped before sorting."""
    if len(counts) <= most:
        return rows, counts
    threshold = np.partition(counts, len(counts) - most)[len(counts) - most]  # the most-th largest count
    above = counts > threshold
    tied = np.flatnonzero(counts == threshold)[: most - int(above.sum())]
    keep = np.sort(np.concatenate([np.flatnonzero(above), tied]))
    return rows[keep], counts[keep]


def calibrate(
    source: str | Path,
    output: str | Path,
    texts: list[str | Path],
    hot_budget: str | int,
    write: WriteOptions = DEFAULT_WRITE,
) -> dict:
    """Calibrate the folder ``source`` on ``texts`` and write ``output`` (see the module); returns the
    report recorded in the new manifest (``calibration``)."""
    source, output = Path(source), Path(output)
    checks = FileChecks()  # the manifest's, then each layer's files (checked by size: the manifest did)
    manifest = read_manifest(source, checks)
    check_output_folder(output, [source])
    if manifest.calibration is not None:
        raise EngramError(f"{source} is already calibrated: calibrate the folder it was made from")
    tables: dict[int, StoredTable] = {}
    for layer_id, name in manifest.layers.items():  # every layer's table checked before any counting
        model, _ = read_openvino(source / name, checks)
        table = stored_table(split_stages(model)[0])
        if table is None:
            raise EngramError(
                f"{source / name}: its table is not one the row kernel reads, so it cannot be served in tiers"
            )
        tables[layer_id] = table
    row_bytes = {layer_id: table.layout.bytes_per_row for layer_id, table in tables.items()}
    total = int(sum(table.layout.table_rows * row_bytes[layer_id] for layer_id, table in tables.items()))
    budget = parse_size(hot_budget, "hot budget", whole=total)
    if budget == 0:
        raise EngramError(f"hot budget must be more than 0 bytes, got {hot_budget!r}")
    counts, text = _count_lookups(manifest.config, list(tables), [Path(t) for t in texts])
    layers = {layer_id: _Layer(manifest.layers[layer_id], tables[layer_id], *counts[layer_id]) for layer_id in tables}
    # measured: a set chosen without the last tenth, on the last tenth; served: the set chosen from all of it
    measured = choose_hot_rows({layer_id: layer.calibration for layer_id, layer in layers.items()}, row_bytes, budget)
    every = {layer_id: _merge_all([layer.calibration, layer.held_out]) for layer_id, layer in layers.items()}
    hot = choose_hot_rows(every, row_bytes, budget)
    hot_bytes = int(sum(len(rows) * row_bytes[layer_id] for layer_id, rows in hot.items()))
    require_disk(output.parent, hot_bytes, f"the hot sets ({sum(len(rows) for rows in hot.values()):,} rows)")
    report: dict = {
        "hot_budget_bytes": budget,
        "tables_bytes": total,
        "text": text,
        "chosen_from": "all the text (the held-out hit rate is of a set chosen from the first nine tenths)",
        "layers": {},
    }
    with staged_folder(output) as staging:
        for name in manifest.files:
            write.place_table(source / name, staging / name)
        for layer_id, layer in layers.items():
            rows = hot[layer_id]
            files = hot_set_files(layer.file)
            _write_hot_set(staging, files, layer.table, rows)
            seen, counts = layer.held_out
            report["layers"][str(layer_id)] = {
                "hot_rows": int(len(rows)),
                "hot_bytes": int(len(rows) * row_bytes[layer_id]),
                "rows_reached": int(len(every[layer_id][0])),
                "held_out_hit_rate": hit_rate(measured[layer_id], seen, counts),
                "files": [files[part] for part in ("rows", *layer.table.layout.part_sizes(0))],
            }
        write_manifest(staging, dataclasses.replace(manifest, calibration=report), known=manifest.files)
    return report


def _count_lookups(config, layer_ids: list[int], texts: list[Path]):
    """Layer -> (calibration, held-out) (rows, lookup counts) of ``texts``, and the text's report. Each
    file is one token sequence (its held-out part another), read and tokenized a piece at a time while
    the piece before is counted (a thread per layer: hashing and sorting run in numpy without the GIL)."""
    hashing = hashing_of(config)
    layers = {layer_id: LayerRows(hashing, config, layer_id) for layer_id in layer_ids}
    counters = {
        layer_id: (RowCounter(rows.table_rows), RowCounter(rows.table_rows)) for layer_id, rows in layers.items()
    }
    digest, tokens, held_out, part = hashlib.sha256(), 0, 0, None
    text_bytes = sum(path.stat().st_size for path in texts if path.is_file())
    with (
        progress.steps("counting row lookups", text_bytes, "GiB") as counter,
        ThreadPoolExecutor(len(layers)) as workers,
    ):
        for piece in _read_ahead(token_pieces(config.tokenizer, texts, HELD_OUT)):
            if (piece.file, piece.held_out) != part:
                part = piece.file, piece.held_out
                for rows in layers.values():
                    rows.start()

            def count(layer_id: int, piece=piece) -> None:
                for rows in layers[layer_id](piece.ids):
                    counters[layer_id][piece.held_out].add(rows)

            list(workers.map(count, layers))
            digest.update(piece.ids.astype("<i8").tobytes())
            tokens += len(piece.ids)
            held_out += len(piece.ids) if piece.held_out else 0
            counter.advance(piece.size)
    if not held_out or held_out == tokens:
        raise EngramError(
            f"text: {tokens:,} tokens, {held_out:,} of them in the last tenth: calibrate needs tokens in both "
            "the first nine tenths (to count) and the last (held out, to measure)"
        )
    report = {
        "files": [path.name for path in texts],
        "tokens_sha256": digest.hexdigest(),
        "tokens": tokens,
        "held_out_tokens": held_out,
    }
    return {layer_id: tuple(c.result() for c in pair) for layer_id, pair in counters.items()}, report


def _read_ahead(pieces):
    """``pieces``, each next one made in a thread while the caller works on the one before."""
    with ThreadPoolExecutor(1) as reader:
        sentinel = object()
        upcoming = reader.submit(next, pieces, sentinel)
        while (piece := upcoming.result()) is not sentinel:
            upcoming = reader.submit(next, pieces, sentinel)
            yield piece


def _write_hot_set(folder: Path, files: dict[str, str], table: StoredTable, rows: np.ndarray) -> None:
    """The hot set of ``rows`` as .npy files (``tiered.hot_set_files``), packed a million rows at a time."""
    layout, arrays = table.layout, table.arrays()
    np.save(folder / files["rows"], rows.astype(np.int64))
    outputs = {
        part: np.lib.format.open_memmap(folder / files[part], mode="w+", dtype=np.uint8, shape=(size,))
        for part, size in layout.part_sizes(len(rows)).items()
    }
    written = dict.fromkeys(outputs, 0)
    with progress.steps(
        f"packing {len(rows):,} hot rows of {files['rows'].split('.')[0]}", len(rows), "rows"
    ) as counter:
        for start in range(0, len(rows), _PACK_ROWS):
            packed = pack_hot_rows(arrays, layout, rows[start : start + _PACK_ROWS])
            for part, data in packed.items():
                outputs[part][written[part] : written[part] + data.size] = data.reshape(-1)
                written[part] += data.size
            counter.advance(min(_PACK_ROWS, len(rows) - start))
    for array in outputs.values():
        array.flush()


def describe(report: dict) -> str:
    """``calibrate``'s report as lines for a terminal: per layer the hot set and its held-out hit rate."""
    mib = 2**20
    lines = [
        f"hot budget {report['hot_budget_bytes'] / mib:,.1f} MiB of {report['tables_bytes'] / mib:,.1f} MiB of tables; "
        f"text {report['text']['tokens']:,} tokens, the last {report['text']['held_out_tokens']:,} held out",
        f"{'layer':>6} {'hot rows':>12} {'hot MiB':>10} {'rows reached':>13} {'held-out hits':>14}",
    ]
    for layer, entry in report["layers"].items():
        lines.append(
            f"{layer:>6} {entry['hot_rows']:>12,} {entry['hot_bytes'] / mib:>10,.1f} {entry['rows_reached']:>13,} "
            f"{entry['held_out_hit_rate']:>14.1%}"
        )
    if report["hot_budget_bytes"] >= report["tables_bytes"]:
        lines.append(
            "the budget is at least the whole tables: every row the text reached is hot; "
            "table_memory='populate' keeps every row resident"
        )
    elif all(entry["hot_rows"] == entry["rows_reached"] for entry in report["layers"].values()):
        lines.append(
            "the budget holds every row the text reached: more text, not more budget, would raise the hit rate"
        )
    return "\n".join(lines)
