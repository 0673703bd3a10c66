"""How concentrated Engram's lookups are on real text: the first measurement of issue 19's hot set.

Text is tokenized with the model's tokenizer (``core.text``), hashed exactly as the model hashes
(``V41Hashing.rows`` or ``EngramHashing.rows``), and each table row's lookups are counted per n-gram
order (``folders.calibrate.row_counts``, what ``engram-export calibrate`` counts). Memory grows with
the distinct rows the text reaches, never with the table. Reported: the share of all lookups that the
most looked-up 0.1%, 1% and 10% of the reached rows take, per order; and the share of a held-out text's
lookups whose rows the first text reached (what a hot set made of every calibration row would serve).
"""

from __future__ import annotations

import numpy as np

from engram_export.folders.calibration import hit_rate, row_counts

__all__ = ["row_counts", "top_shares", "held_out_coverage", "SHARES"]

SHARES = (0.001, 0.01, 0.1)


def top_shares(counts: np.ndarray, shares=SHARES) -> list[float]:
    """The share of all lookups that the most looked-up ``share`` of the rows take, for each share."""
    ordered = np.sort(counts)[::-1]
    total = ordered.sum()
    return [float(ordered[: max(1, round(share * len(ordered)))].sum() / total) for share in shares]


def held_out_coverage(seen_rows: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> float:
    """The share of the lookups (``rows`` with ``counts``) that fall on ``seen_rows``."""
    return hit_rate(seen_rows, rows, counts)
