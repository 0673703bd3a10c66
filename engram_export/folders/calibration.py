"""``engram-export calibrate``: choose each layer's hot table rows on real text and write a folder that
serves them from memory (``table_memory="tiered"``, ``openvino/tiered.py``).

The text is tokenized with the model's own tokenizer and hashed exactly as the model hashes; each
layer's row lookups are counted (memory grows with the distinct rows the text reaches, never with the
table). The hot set is the rows that earn the most lookups per stored byte, chosen across every layer
together, up to the budget. The last tenth of the text is held back: the share of its lookups that the
hot set serves is reported per layer and recorded in the manifest, with the budget and a SHA-256 of the
tokens. The new folder holds hard links to the input's files (never written), each layer's hot set
(packed rows in their stored form) and a manifest that binds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.core.fileio import check_output_folder, link_or_copy, staged_folder
from engram_export.core.integrity import FileChecks
from engram_export.core.resources import parse_size, require_disk
from engram_export.core.text import token_stream
from engram_export.folders.manifest import read_manifest, write_manifest
from engram_export.models.config import is_deepseek_v41
from engram_export.models.deepseek_v41 import V41Hashing
from engram_export.models.hashing import EngramHashing
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.row_kernel import StoredTable, stored_table
from engram_export.openvino.stages import split_stages
from engram_export.openvino.tiered import hot_set_files, pack_hot_rows

__all__ = ["calibrate", "describe", "row_counts", "all_orders", "choose_hot_rows", "hit_rate", "HELD_OUT"]

HELD_OUT = 0.1  # the last tenth of the tokens: the hit rate is measured there
_WINDOW = 4096  # tokens hashed at once (each window's first N-1 tokens see pads: a negligible edge)
_PACK_ROWS = 1 << 20  # hot rows packed and written at once (an even number: u4 zero points stay whole bytes)


def _rows(hashing, config, layer_id: int, ids: np.ndarray) -> np.ndarray:
    """Table rows [T, C] of the raw ids ``ids`` [T], hashed as the model does."""
    if is_deepseek_v41(config):
        return hashing.rows(ids[None], np.ones((1, len(ids)), bool), layer_id)[0]
    return hashing.rows(ids[None], layer_id)[0]


def _hashing(config):
    return V41Hashing(config) if is_deepseek_v41(config) else EngramHashing(config)


def _heads_per_order(config) -> int:
    return config.n_heads if is_deepseek_v41(config) else config.n_head_per_ngram


_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def row_counts(
    hashing, config, layer_id: int, stream: np.ndarray, counter=None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per n-gram order n: (rows, lookup counts) of every row the token ``stream`` reaches (sorted).
    ``counter``: a ``progress.steps`` counter advanced by the tokens hashed. Each window's counts wait
    in a buffer until it holds as many rows as the merged counts (then one merge): O(n log n) work, memory
    within twice the distinct rows reached."""
    heads = _heads_per_order(config)
    counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for start in range(0, len(stream), _WINDOW):
        window = stream[start : start + _WINDOW]
        rows = _rows(hashing, config, layer_id, window).astype(np.int64)
        for first in range(0, rows.shape[1], heads):
            order = 2 + first // heads
            buffer = pending.setdefault(order, [])
            buffer.append(np.unique(rows[:, first : first + heads], return_counts=True))
            if sum(len(r) for r, _ in buffer) >= max(len(counts.get(order, _EMPTY)[0]), 1 << 20):
                counts[order] = _merge_all([counts.get(order, _EMPTY), *buffer])
                buffer.clear()
        if counter is not None:
            counter.advance(len(window))
    for order, buffer in pending.items():
        counts[order] = _merge_all([counts.get(order, _EMPTY), *buffer])
    return dict(sorted(counts.items()))


def _merge_all(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, counts) of several such pairs, a row's counts summed. Each row is packed with its count
    into one uint64 and the keys sorted (no argsort: about 3x faster); past 63 bits, ``np.unique``."""
    rows = np.concatenate([r for r, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    if not len(rows):
        return _EMPTY
    count_bits = max(1, int(counts.max()).bit_length())
    if int(rows.max()).bit_length() + count_bits > 63:
        unique, inverse = np.unique(rows, return_inverse=True)
        return unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)
    keys = rows.astype(np.uint64) << np.uint64(count_bits) | counts.astype(np.uint64)
    keys.sort()
    sorted_rows = (keys >> np.uint64(count_bits)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    summed = np.add.reduceat((keys & np.uint64((1 << count_bits) - 1)).astype(np.int64), starts)
    return sorted_rows[starts], summed


def hit_rate(hot: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> float:
    """The share of the lookups (``rows`` with their ``counts``) that fall on the rows ``hot``."""
    return float(counts[np.isin(rows, hot)].sum() / max(1, counts.sum()))


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
    per_byte = np.concatenate([counts[layer][1] / row_bytes[layer] for layer in layers])
    which = np.concatenate([np.full(len(counts[layer][0]), index) for index, layer in enumerate(layers)])
    rows = np.concatenate([counts[layer][0] for layer in layers])
    order = np.lexsort((rows, which, -per_byte))
    sizes = np.array([row_bytes[layer] for layer in layers])[which[order]]
    taken = order[: int(np.searchsorted(np.cumsum(sizes), budget, side="right"))]
    return {layer: np.sort(rows[taken[which[taken] == index]]) for index, layer in enumerate(layers)}


def calibrate(
    source: str | Path,
    output: str | Path,
    texts: list[str | Path],
    hot_budget: str | int,
    copy_table: bool = False,
) -> dict:
    """Calibrate the folder ``source`` on ``texts`` and write ``output`` (see the module); returns the
    report recorded in the new manifest (``calibration``)."""
    source, output = Path(source), Path(output)
    manifest = read_manifest(source)
    check_output_folder(output, [source])
    if manifest.calibration is not None:
        raise EngramError(f"{source} is already calibrated: calibrate the folder it was made from")
    stream = token_stream(manifest.config.tokenizer, list(texts))
    cut = len(stream) - max(1, int(len(stream) * HELD_OUT))
    if cut < 1:
        raise EngramError(f"text: {len(stream)} tokens; calibrate needs at least 2 (the last tenth is held out)")
    hashing = _hashing(manifest.config)
    tables: dict[int, StoredTable] = {}
    for layer_id, name in manifest.layers.items():  # every layer's table checked before any counting
        model, _ = read_openvino(source / name, FileChecks("size"))  # the manifest's checks are done
        table = stored_table(split_stages(model)[0])
        if table is None:
            raise EngramError(
                f"{source / name}: its table is not one the row kernel reads, so it cannot be served in tiers"
            )
        tables[layer_id] = table
    with progress.steps("counting row lookups", len(stream) * len(manifest.layers), "tokens") as counter:

        def count(layer_id: int) -> _Layer:
            calibration = all_orders(row_counts(hashing, manifest.config, layer_id, stream[:cut], counter))
            held_out = all_orders(row_counts(hashing, manifest.config, layer_id, stream[cut:], counter))
            return _Layer(manifest.layers[layer_id], tables[layer_id], calibration, held_out)

        # a thread per layer: numpy's sorts, most of the work, run without the GIL
        with ThreadPoolExecutor(min(len(tables), os.cpu_count() or 1)) as workers:
            layers = dict(zip(tables, workers.map(count, tables), strict=True))
    row_bytes = {layer_id: layer.table.layout.bytes_per_row for layer_id, layer in layers.items()}
    total = int(sum(layer.table.layout.table_rows * row_bytes[layer_id] for layer_id, layer in layers.items()))
    budget = parse_size(hot_budget, "hot budget", whole=total)
    if budget == 0:
        raise EngramError(f"hot budget must be more than 0 bytes, got {hot_budget!r}")
    hot = choose_hot_rows({layer_id: layer.calibration for layer_id, layer in layers.items()}, row_bytes, budget)
    hot_bytes = int(sum(len(rows) * row_bytes[layer_id] for layer_id, rows in hot.items()))
    require_disk(output.parent, hot_bytes, f"the hot sets ({sum(len(rows) for rows in hot.values()):,} rows)")
    report: dict = {
        "hot_budget_bytes": budget,
        "tables_bytes": total,
        "text": {
            "files": [Path(t).name for t in texts],
            "tokens_sha256": hashlib.sha256(stream.astype("<i8").tobytes()).hexdigest(),
            "tokens": int(len(stream)),
            "held_out_tokens": int(len(stream) - cut),
        },
        "layers": {},
    }
    with staged_folder(output) as staging:
        for name in manifest.files:
            link_or_copy(source / name, staging / name, copy_table)
        for layer_id, layer in layers.items():
            rows = hot[layer_id]
            files = hot_set_files(layer.file)
            _write_hot_set(staging, files, layer.table, rows)
            seen, counts = layer.held_out
            report["layers"][str(layer_id)] = {
                "hot_rows": int(len(rows)),
                "hot_bytes": int(len(rows) * row_bytes[layer_id]),
                "rows_reached": int(len(layer.calibration[0])),
                "held_out_hit_rate": hit_rate(rows, seen, counts),
                "files": [files[part] for part in ("rows", *layer.table.layout.part_sizes(0))],
            }
        write_manifest(staging, dataclasses.replace(manifest, calibration=report), known=manifest.files)
    return report


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
