"""The hash-gather operator in PyTorch: raw ids -> compressed ids -> n-gram hashes -> table rows.

One ``torch.library.custom_op`` so that ``torch.onnx.export`` sees the hash and the lookup as a single
node, which the exporter's custom translation table turns into one ``engram.HashGather`` ONNX node
(see ``engram_export/onnx/op.py``). Eager execution runs the numpy reference kernel.
"""

from __future__ import annotations

import torch

from engram_export.models.hashing import hash_rows

__all__ = ["hash_gather"]


@torch.library.custom_op("engram_export::hash_gather", mutates_args=())
def hash_gather(
    input_ids: torch.Tensor,
    compress_lut: torch.Tensor,
    table: torch.Tensor,
    multipliers: list[int],
    primes: list[int],
    pad_id: int,
    n_head_per_ngram: int,
) -> torch.Tensor:
    """Embeddings [B, T, H*d] of raw ids [B, T] from the multi-head table [sum(primes), d]."""
    rows = hash_rows(input_ids.numpy(), compress_lut.numpy(), multipliers, primes, pad_id, n_head_per_ngram)
    return table[torch.from_numpy(rows)].flatten(-2)


@hash_gather.register_fake
def _(input_ids, compress_lut, table, multipliers, primes, pad_id, n_head_per_ngram):
    batch, length = input_ids.shape
    return table.new_empty(batch, length, len(primes) * table.shape[1])
