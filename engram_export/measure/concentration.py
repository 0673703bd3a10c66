"""How concentrated Engram's lookups are on real text: the first measurement of issue 19's hot set.

Text is tokenized with the model's tokenizer (``core.text``), hashed exactly as the model hashes
(``V41Hashing.rows`` or ``EngramHashing.rows``), and each table row's lookups are counted per n-gram
order. Memory grows with the distinct rows the text reaches, never with the table. Reported: the share
of all lookups that the most looked-up 0.1%, 1% and 10% of the reached rows take, per order; and the
share of a held-out text's lookups whose rows the first text reached (what a hot set made of every
calibration row would serve).
"""

from __future__ import annotations

import numpy as np

from engram_export.models.config import is_deepseek_v41

__all__ = ["row_counts", "top_shares", "held_out_coverage", "SHARES"]

SHARES = (0.001, 0.01, 0.1)
_WINDOW = 4096  # tokens hashed at once (each window's first N-1 tokens see pads: a negligible edge)


def _rows(hashing, config, layer_id: int, ids: np.ndarray) -> np.ndarray:
    """Table rows [T, C] of the raw ids ``ids`` [T], hashed as the model does."""
    if is_deepseek_v41(config):
        return hashing.rows(ids[None], np.ones((1, len(ids)), bool), layer_id)[0]
    return hashing.rows(ids[None], layer_id)[0]


def _heads_per_order(config) -> int:
    return config.n_heads if is_deepseek_v41(config) else config.n_head_per_ngram


def _merge(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]):
    rows, inverse = np.unique(np.concatenate([first[0], second[0]]), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([first[1], second[1]]), minlength=len(rows))
    return rows, counts.astype(np.int64)


def row_counts(hashing, config, layer_id: int, stream: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per n-gram order n: (rows, lookup counts) of every row the token ``stream`` reaches (sorted)."""
    heads = _heads_per_order(config)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, len(stream), _WINDOW):
        rows = _rows(hashing, config, layer_id, stream[start : start + _WINDOW]).astype(np.int64)
        for first in range(0, rows.shape[1], heads):
            order = 2 + first // heads
            found = np.unique(rows[:, first : first + heads], return_counts=True)
            counts[order] = _merge(counts.get(order, empty), found)
    return dict(sorted(counts.items()))


def top_shares(counts: np.ndarray, shares=SHARES) -> list[float]:
    """The share of all lookups that the most looked-up ``share`` of the rows take, for each share."""
    ordered = np.sort(counts)[::-1]
    total = ordered.sum()
    return [float(ordered[: max(1, round(share * len(ordered)))].sum() / total) for share in shares]


def held_out_coverage(seen_rows: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> float:
    """The share of the lookups (``rows`` with ``counts``) that fall on ``seen_rows``."""
    return float(counts[np.isin(rows, seen_rows)].sum() / counts.sum())
