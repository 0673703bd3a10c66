"""``bench tiered``'s tables at depth: a dense DeepSeek-V4.1 table on disk giving a GPU engine its rows
through the row API, each Engram layer's rows waited for when the backbone reaches it
(``depth_rows.py``).

Decode for step times of 5, 15 and 50 ms and B = 1, 8 and 64: the same rows warm in the page cache
(``mmap``, every row of the round read once before it: the row API's own cost), the table tiered (hot
set and cache, the tail cold on disk: evicted before every round), and tiered with the candidates'
reads. Then prompts served one after another, tiered with and without the next queued prompt's rows
read ahead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engram_export.measure.common import evict_page_cache
from engram_export.measure.depth import BATCHES, STEP_TIMES_S
from engram_export.measure.depth_rows import NgramCandidates, RowsMode, prefill_depth_table, rows_depth_table
from engram_export.measure.v41_text import PREFILL_STEP_S
from engram_export.models.deepseek_v41_config import V41Hashing
from engram_export.runtime.rows import EngramRows

__all__ = ["depth_tables", "CACHE_BUDGET", "CANDIDATES", "PROMPT_TOKENS"]

CACHE_BUDGET = "64MiB"
CANDIDATES = (1, 4)  # next tokens a sequence's rows are read ahead for, each its own mode
PROMPT_TOKENS = 128


def depth_tables(
    config,
    compiled: Path,
    tiered: Path,
    calibration: np.ndarray,
    held_out: np.ndarray,
    backbone_layers: int,
    steps: int,
    rounds: int,
    step_times: tuple[float, ...] = STEP_TIMES_S,
    batches: tuple[int, ...] = BATCHES,
) -> str:
    """The decode and prefill tables (see the module) of ``tiered`` (calibrated from ``compiled``), on
    ``held_out`` tokens; candidates from an n-gram model of ``calibration``."""
    hashing = V41Hashing(config)

    def cold() -> None:
        evict_page_cache(compiled)

    def tiered_rows() -> EngramRows:
        return EngramRows(tiered, table_memory="tiered", cache_budget=CACHE_BUDGET)

    warm = RowsMode("warm (page cache)", lambda: EngramRows(compiled, table_memory="mmap"), warm=True)
    plain = RowsMode("tiered", tiered_rows, cold)
    ahead = [
        RowsMode(f"tiered + {k} candidate{'s' * (k > 1)}", tiered_rows, cold, NgramCandidates(calibration, k))
        for k in CANDIDATES
    ]
    decode = rows_depth_table(
        hashing, [warm, plain, *ahead], held_out, backbone_layers, step_times, batches, steps, rounds
    )
    prefill = prefill_depth_table(
        hashing,
        [(warm, False), (plain, False), (plain, True)],
        held_out,
        backbone_layers,
        PREFILL_STEP_S,
        PROMPT_TOKENS,
        prompts=16,
    )
    layers = ", ".join(str(layer) for layer in sorted(config.layer_ids))
    return (
        f"rows for a GPU engine at depth: Engram layers {layers} of a {backbone_layers}-layer backbone, each step's "
        f"reads issued when it begins (row API start, packed rows), each layer's rows waited for when the backbone "
        f"reaches it; tiered: the calibrated hot set, a {CACHE_BUDGET} cache, the tail cold on disk (evicted before "
        f"every round); candidates: the rows of each sequence's k likeliest next tokens (a trigram model of the "
        f"calibration text) read into the cache once a step's last Engram layer is served, what is left of them "
        f"dropped when the next step begins; {rounds} rounds of "
        f"{steps} steps, a fresh EngramRows each; 'vs first': tokens/s against the warm rows; hot / cache / "
        f"candidates / read: shares of the lookups\n{decode}\n\n"
        f"prefill at depth: 16 prompts of {PROMPT_TOKENS} tokens one after another, {PREFILL_STEP_S * 1e3:g} ms "
        f"each on the GPU; read-ahead: while a prompt is served, the rows of the next one in the queue are read "
        f"into the cache\n{prefill}"
    )
