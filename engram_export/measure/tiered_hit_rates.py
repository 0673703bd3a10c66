"""``bench tiered``'s first tables: how much of held-out text's lookups a calibrated hot set serves.

On the released layout (384M rows a layer, counted, no table needed): per layer and n-gram order, the
share of the held-out lookups that the hot set serves at budgets of 0.1%, 1% and 10% of the table rows
and at every row the calibration text reached, beside the oracle (the best set of the same size, chosen
on the held-out text itself); then the hit rate against the amount of calibration text (10%, 50%, 100%).
"""

from __future__ import annotations

import numpy as np

from engram_export.core import progress
from engram_export.folders.calibration import all_orders, choose_hot_rows, hit_rate, row_counts
from engram_export.measure.common import format_table
from engram_export.models.deepseek_v41_config import V41Config, V41Hashing

__all__ = ["hit_rate_tables", "BUDGETS"]

BUDGETS = (0.001, 0.01, 0.1)  # hot sets as shares of the table rows


def _per_order(config, stream: np.ndarray) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    hashing = V41Hashing(config)
    return {layer: row_counts(hashing, config, layer, stream) for layer in config.layer_ids}


def _oracle(held_out: dict, size: int) -> dict[int, np.ndarray]:
    """The ``size`` rows (across layers) with the most held-out lookups."""
    merged = {layer: all_orders(orders) for layer, orders in held_out.items()}
    return choose_hot_rows(merged, dict.fromkeys(merged, 1), size)


def hit_rate_tables(config: V41Config, calibration_stream: np.ndarray, held_out_stream: np.ndarray) -> str:
    """The two tables (see the module) as text: ``config`` hashes both token streams."""
    stream = np.concatenate([calibration_stream, held_out_stream])
    cut = len(calibration_stream)
    with progress.stage(f"counting lookups of {len(stream):,} tokens on the released layout"):
        calibration, held_out = _per_order(config, stream[:cut]), _per_order(config, stream[cut:])
    total_rows = sum(config.num_embeddings)
    reached = {layer: all_orders(orders) for layer, orders in calibration.items()}
    every = sum(len(rows) for rows, _ in reached.values())
    budgets = [(f"{share:.1%} of rows", int(share * total_rows)) for share in BUDGETS]
    budgets.append((f"every row reached ({every / total_rows:.2%})", every))
    orders = sorted(next(iter(calibration.values())))
    headers = ["hot budget", "rows"] + [f"L{layer} {order}-gram" for layer in config.layer_ids for order in orders]
    lines = []
    for name, size in budgets:
        hot = choose_hot_rows(reached, dict.fromkeys(reached, 1), size)
        oracle = _oracle(held_out, sum(len(rows) for rows in hot.values()))
        cells = [
            f"{hit_rate(hot[layer], *lookups):.0%} ({hit_rate(oracle[layer], *lookups):.0%})"
            for layer in config.layer_ids
            for lookups in (held_out[layer][order] for order in orders)
        ]
        lines.append([name, f"{sum(len(r) for r in hot.values()):,}", *cells])
    table = format_table(lines, headers)
    amount_lines = []
    for share in (0.1, 0.5, 1.0):
        part = _per_order(config, stream[: int(cut * share)]) if share < 1 else calibration
        seen = {layer: all_orders(orders) for layer, orders in part.items()}
        one_percent = choose_hot_rows(seen, dict.fromkeys(seen, 1), int(0.01 * total_rows))
        amount_lines.append(
            [f"{share:.0%} ({int(cut * share):,} tokens)"]
            + [f"{hit_rate(seen[layer][0], *all_orders(held_out[layer])):.0%}" for layer in config.layer_ids]
            + [f"{hit_rate(one_percent[layer], *all_orders(held_out[layer])):.0%}" for layer in config.layer_ids]
        )
    amount = format_table(
        amount_lines,
        ["calibration text"]
        + [f"L{layer} every row reached" for layer in config.layer_ids]
        + [f"L{layer} 1% of rows" for layer in config.layer_ids],
    )
    return (
        f"held-out hit rate, released layout ({total_rows:,} rows in {len(config.layer_ids)} layers), "
        f"{cut:,} tokens calibrate, {len(stream) - cut:,} held out; in brackets the oracle of the same size:\n"
        f"{table}\n\nheld-out hit rate against the amount of calibration text:\n{amount}"
    )
