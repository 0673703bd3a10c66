"""Multi-head n-gram hashing (spec sections 2-4), bit-exact with the reference demo.

``EngramHashing`` derives, once per config, what every runtime needs: the compression table, the
compressed pad id, and per layer the odd multipliers and the head primes. ``hash_rows`` is the pure
numpy reference kernel of the hash-gather operator's index computation; every other kernel (ONNX
function body, OpenVINO extension) is tested against it.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np

from engram_export.core.errors import EngramError
from engram_export.models.config import MAX_TABLE_ROWS, EngramConfig
from engram_export.models.primes import INT64_MAX, LAYER_SEED_STRIDE, _next_prime, is_prime

__all__ = ["EngramHashing", "hash_rows", "is_prime", "compress_ids", "INT32_MIN"]

INT32_MIN = int(np.iinfo(np.int32).min)


def compress_ids(input_ids: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map raw ids through the compression table; negative ids pass through (as in the demo)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    return np.where(ids >= 0, lut[np.clip(ids, 0, len(lut) - 1)], ids)


def hash_rows(
    input_ids: np.ndarray, lut: np.ndarray, multipliers, primes, pad_id: int, n_head_per_ngram: int
) -> np.ndarray:
    """Reference kernel: raw ids [B,T] -> table rows [B,T,H] (head hash + head offset), int64.

    ``pad_id`` is the *compressed* pad id. Arithmetic is int64 and wraps like the demo's numpy code.
    """
    x = compress_ids(input_ids, lut)
    batch, length = x.shape
    multipliers = np.asarray(multipliers, dtype=np.int64)
    primes = np.asarray(primes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(primes)[:-1]]).astype(np.int64)
    padded = np.concatenate([np.full((batch, len(multipliers) - 1), pad_id, np.int64), x], axis=1)
    shifted = [padded[:, len(multipliers) - 1 - k :][:, :length] for k in range(len(multipliers))]
    heads = []
    mix = shifted[0] * multipliers[0]
    for order in range(2, len(multipliers) + 1):
        mix = np.bitwise_xor(mix, shifted[order - 1] * multipliers[order - 1])
        first = (order - 2) * n_head_per_ngram
        for prime in primes[first : first + n_head_per_ngram]:
            heads.append(mix % prime)
    return np.stack(heads, axis=2) + offsets


@dataclasses.dataclass(frozen=True)
class EngramHashing:
    """Everything the hash needs, derived from a config (and its tokenizer) exactly as the demo does."""

    config: EngramConfig

    @cached_property
    def lut(self) -> np.ndarray:
        """Compression table old id -> new id (int64); identity over vocab_size with no tokenizer."""
        if self.config.tokenizer is None:
            return np.arange(self.config.vocab_size, dtype=np.int64)
        from engram_export.models.compression import build_compression_table

        return build_compression_table(self.config.tokenizer)

    @cached_property
    def compressed_vocab_size(self) -> int:
        return int(self.lut.max()) + 1

    @cached_property
    def pad_id(self) -> int:
        """The compressed pad id (the demo compresses pad_id too)."""
        if not 0 <= self.config.pad_id < len(self.lut):
            raise EngramError(f"config: pad_id {self.config.pad_id} is outside the tokenizer's {len(self.lut)} ids")
        return int(self.lut[self.config.pad_id])

    def multipliers(self, layer_id: int) -> list[int]:
        """The layer's odd hash multipliers, one per token of the longest n-gram."""
        self._check_layer(layer_id)
        half = max(1, (int(INT64_MAX) // self.compressed_vocab_size) // 2)
        rng = np.random.default_rng(self.config.seed + LAYER_SEED_STRIDE * layer_id)
        drawn = rng.integers(0, half, size=self.config.max_ngram_size, dtype=np.int64)
        return [int(m) for m in drawn * 2 + 1]

    @cached_property
    def _primes_by_layer(self) -> dict[int, list[int]]:
        seen: set[int] = set()
        by_layer = {}
        for layer_id in self.config.layer_ids:
            primes = []
            for base in self.config.engram_vocab_size:
                start = base - 1
                for _ in range(self.config.n_head_per_ngram):
                    start = _next_prime(start, seen)
                    seen.add(start)
                    primes.append(start)
            if sum(primes) > MAX_TABLE_ROWS:
                raise EngramError(
                    f"config: layer {layer_id}'s table would have {sum(primes)} rows, "
                    f"more than {MAX_TABLE_ROWS} (smaller engram_vocab_size?)"
                )
            by_layer[layer_id] = primes
        return by_layer

    def primes(self, layer_id: int) -> list[int]:
        """Head moduli of the layer, order by order, head by head (each head's table size)."""
        self._check_layer(layer_id)
        return list(self._primes_by_layer[layer_id])

    def offsets(self, layer_id: int) -> list[int]:
        primes = self.primes(layer_id)
        return [sum(primes[:h]) for h in range(len(primes))]

    def table_rows(self, layer_id: int) -> int:
        return sum(self.primes(layer_id))

    def rows(self, input_ids: np.ndarray, layer_id: int) -> np.ndarray:
        """Table rows [B,T,H] the layer reads for raw ids [B,T]."""
        return hash_rows(
            input_ids,
            self.lut,
            self.multipliers(layer_id),
            self.primes(layer_id),
            self.pad_id,
            self.config.n_head_per_ngram,
        )

    def check_ids(self, input_ids: np.ndarray) -> None:
        """Refuse ids the tables cannot take: at or past the vocabulary, or below int32."""
        if input_ids.size == 0:
            return
        high, low = int(input_ids.max()), int(input_ids.min())
        if high >= len(self.lut):
            raise EngramError(
                f"input_ids: id {high} is out of range [0, {len(self.lut)}) "
                f"(negative ids pass through as in the reference)"
            )
        if low < INT32_MIN:
            raise EngramError(f"input_ids: negative id {low} is below int32's range")

    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self.config.layer_ids:
            raise EngramError(f"layer {layer_id} is not an Engram layer (layer_ids = {list(self.config.layer_ids)})")
