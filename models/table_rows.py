"""The table rows a layer of either family looks up, from one call: what counts lookups (calibrate),
plans shards (serve-tables) and asks shards for rows (a runtime whose tables are remote) share."""

from __future__ import annotations

import numpy as np

from engram_export.models.config import EngramConfig
from engram_export.models.deepseek_v41_config import V41Config, V41Hashing
from engram_export.models.hashing import EngramHashing

__all__ = ["hashing_of", "table_rows"]


def hashing_of(config: EngramConfig | V41Config) -> EngramHashing | V41Hashing:
    """The hashing (compression table, multipliers, head primes) of ``config``'s family."""
    return V41Hashing(config) if isinstance(config, V41Config) else EngramHashing(config)


def table_rows(hashing: EngramHashing | V41Hashing, ids: np.ndarray, mask: np.ndarray | None, layer_id: int):
    """Table rows [B, T, C] of raw ids [B, T]; ``mask`` (False: an image token, which blocks n-grams) is
    read by DeepSeek-V4.1 only (all True when None)."""
    if isinstance(hashing, V41Hashing):
        return hashing.rows(ids, np.ones(ids.shape, bool) if mask is None else mask, layer_id)
    return hashing.rows(ids, layer_id)
