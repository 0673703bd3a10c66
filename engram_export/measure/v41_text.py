"""The DeepSeek-V4.1 model that the benches on real text serve (``bench tiered``, ``bench ray``) and the
samples hash with: the preset over a real tokenizer's compression, its tables written densely once and
compiled, and one round of token-by-token decode with each Engram layer at its depth in a backbone's step."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import numpy as np

from engram_export.core import progress
from engram_export.folders.pipeline import compile_folder, export_checkpoint
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.measure.depth import DepthRound, DepthSchedule, run_round
from engram_export.models.compression import build_compression_table
from engram_export.models.config import load_config
from engram_export.models.deepseek_v41_config import V41Config, head_primes

__all__ = [
    "v41_with_tokenizer",
    "dense_checkpoint",
    "compiled_v41",
    "decode_round",
    "ROW_BYTES",
    "DECODE_STEP_S",
    "PREFILL_STEP_S",
]

ROW_BYTES = 264  # a V4.1 row: 256 FP8 codes and 8 E8M0 scales
DECODE_STEP_S = 0.015  # one decode step of a GPU backbone
PREFILL_STEP_S = 0.030  # one prefill step of it (a 50 x 14 chunk, a prompt of 128 tokens)


def v41_with_tokenizer(tokenizer: Path, rows_per_layer: int | None = None) -> V41Config:
    """The deepseek-v41 preset with ``tokenizer``'s compression; tables of about ``rows_per_layer`` rows
    (default: the released 384M)."""
    lut = build_compression_table(str(tokenizer))
    config = dataclasses.replace(
        load_config("deepseek-v41"),
        tokenizer=str(tokenizer),
        vocab_size=len(lut),
        compressed_vocab_size=int(lut.max()) + 1,
    )
    if rows_per_layer is None:
        return config
    # the served model: the released row shape, a narrow backbone (hidden 512, not 5120) so that the fuse
    # stage's projection does not drown the table's costs on a 2-core machine
    config = dataclasses.replace(config, hidden_size=512)
    vocab = max(rows_per_layer // config.num_heads, config.compressed_vocab_size + 1)
    primes = head_primes(vocab, config.max_ngram_size, config.n_head_per_ngram, len(config.layer_ids))
    return dataclasses.replace(config, engram_vocab_size=vocab, num_embeddings=tuple(sum(p) for p in primes))


def dense_checkpoint(config: V41Config, folder: Path) -> Path:
    """A V4.1 checkpoint whose tables are written densely (random FP8 codes, no NaN; scales 2^-7..2^0),
    once: a folder that holds one is reused."""
    done = folder / "dense.json"
    record = {"num_embeddings": list(config.num_embeddings), "tokenizer": config.tokenizer}
    if done.is_file() and json.loads(done.read_text()) == record:
        return folder
    checkpoint = write_v41_checkpoint(
        folder, config.to_dict(), rows={layer: np.zeros(0, np.int64) for layer in config.layer_ids}
    )
    rng = np.random.default_rng(0)
    total = sum(config.num_embeddings) * ROW_BYTES
    with progress.steps("writing the dense tables", total, "GiB") as counter:
        for shard in sorted(checkpoint.glob("*.safetensors")):
            with open(shard, "r+b") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(length))
                for name, entry in header.items():
                    if not name.endswith(("embed.weight", "embed.scale")):
                        continue
                    start, end = (8 + length + offset for offset in entry["data_offsets"])
                    for at in range(start, end, 1 << 28):
                        size = min(1 << 28, end - at)
                        if name.endswith("embed.weight"):
                            data = rng.integers(0, 256, size, np.uint8)
                            data[(data & 0x7F) == 0x7F] ^= 1  # no NaN codes
                        else:
                            data = (120 + rng.integers(0, 8, size)).astype(np.uint8)
                        file.seek(at)
                        file.write(data.tobytes())
                        counter.advance(size)
    (checkpoint / "tokenizer.json").write_bytes(Path(str(config.tokenizer)).read_bytes())
    done.write_text(json.dumps(record))
    return checkpoint


def compiled_v41(config: V41Config, folder: Path) -> Path:
    """``config``'s dense checkpoint, exported and compiled (f32) under ``folder``, made once: the
    folder ``folder/compiled`` (the checkpoint in ``folder/checkpoint``)."""
    checkpoint = dense_checkpoint(config, folder / "checkpoint")
    compiled, made_from = folder / "compiled", folder / "compiled_from.json"
    record = (folder / "checkpoint" / "dense.json").read_text()
    if not (compiled / "manifest.json").is_file() or not made_from.is_file() or made_from.read_text() != record:
        for stale in (compiled, folder / "onnx"):
            shutil.rmtree(stale, ignore_errors=True)
        compile_folder(export_checkpoint(checkpoint, folder / "onnx"), compiled, "f32")
        made_from.write_text(record)
    return compiled


def decode_round(runtime, ids, hidden, prefetch: bool, schedule: DepthSchedule) -> DepthRound:
    """One round of token-by-token decode of ``ids`` [B, S] through a decode session on ``schedule``
    (``depth.py``): when a step begins its lookups are prefetched if ``prefetch``, and each Engram layer
    is stepped (looked up, if not prefetched, and fused, on the CPU) when the backbone reaches it."""
    batch = ids.shape[0]
    session = runtime.session(batch)
    session.prefill(ids[:, :1], {layer: hidden[:, :1] for layer in runtime})

    def issue(t: int):
        step_ids = ids[:, t + 1 : t + 2]
        if prefetch:
            session.prefetch(step_ids)
        return step_ids

    def fuse(step_ids, layer: int) -> None:
        session.step(step_ids, {layer: hidden[:, :1]})

    return run_round(schedule, ids.shape[1] - 1, batch, issue, fuse)
