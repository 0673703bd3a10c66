"""Synthetic DeepSeek-V4.1 checkpoints at any size, for tests and benchmarks (no model hub here).

``write_v41_checkpoint`` writes a Hugging Face style folder: ``config.json``, optionally a
``tokenizer.json`` that compresses to the config's ``engram_compressed_vocab_size``, one safetensors
shard per Engram layer and ``model.safetensors.index.json``. A table of the released size (384M rows,
about 101 GB with its scales) is a *sparse* file: the shard is sized with ``truncate`` and only the
rows asked for are written (a few MB on disk); rows never written read as zeros, a valid FP8 value.
Every row's bytes are a fixed function of (seed, layer, row), so any subset gives the same table. The
table is FP8 with E8M0 scales (as released) or, with ``table_dtype``, BF16 or F32 without scales.

FP8 values come in two kinds (``values``): ``"codes"``, uniformly random bytes (every FP8 code used: what
bit-exactness tests want; magnitudes log-uniform over the whole FP8 range, and block scales spread over
2^7), or ``"trained"``, what quantizing a trained bf16 tensor gives: Gaussian values, a log-normal
magnitude per row, each 32-value block (32x32 for ``wkv``) scaled by the power of two that brings its
largest value under 448, as DeepSeek's FP8 checkpoints are made. Accuracy floors of quantized models
are measured on the second: per-tensor INT8 activations cannot resolve log-uniform values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models

from engram_export.core.checkpoint import DTYPE_BYTES
from engram_export.models.deepseek_v41_config import BLOCK, TABLE_DTYPES, V41Config, _expected

__all__ = ["write_v41_checkpoint", "table_rows_bytes", "float_rows_bytes", "write_word_tokenizer"]


def _mix(*keys: np.ndarray | int) -> np.ndarray:
    """A splitmix64-style hash of uint64 keys: deterministic pseudo-random bits."""
    with np.errstate(over="ignore"):
        x = np.asarray(np.uint64(0x9E3779B97F4A7C15))
        for key in keys:
            x = (x ^ np.asarray(key, np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(31)
        return x * np.uint64(0x94D049BB133111EB) ^ (x >> np.uint64(29))


def _fp8(bits: np.ndarray) -> np.ndarray:
    """E4M3 bytes from random bits, without the NaN codes (0x7F, 0xFF become 448 and -448)."""
    values = bits.astype(np.uint8) if bits.dtype == np.uint8 else (bits & np.uint64(0xFF)).astype(np.uint8)
    values -= ((values & 0x7F) == 0x7F).view(np.uint8)  # no fancy indexing: much faster
    return values


def _gaussian(bits_a: np.ndarray, bits_b: np.ndarray) -> np.ndarray:
    """Standard normal values from two arrays of random uint64 bits (Box-Muller)."""
    u1 = ((bits_a >> np.uint64(11)).astype(np.float64) + 1) / 2.0**53
    u2 = (bits_b >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def _to_fp8_blocks(values: np.ndarray, block_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(E4M3 codes, E8M0 scale bytes) of ``values`` shaped with blocks on ``block_axes`` (the scale is
    the power of two that brings each block's largest magnitude under 448)."""
    amax = np.maximum(np.abs(values).max(axis=block_axes, keepdims=True), 2.0**-100)
    exponent = np.clip(np.ceil(np.log2(amax / 448)), -127, 127)
    scaled = torch.from_numpy((values / 2.0**exponent).astype(np.float32))
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return codes, (exponent + 127).astype(np.uint8).squeeze(block_axes)


def table_rows_bytes(config: V41Config, layer_id: int, rows: np.ndarray, seed: int = 0, values: str = "codes"):
    """(FP8 values [n, head_dim], E8M0 scales [n, head_dim/32]) of table rows ``rows``, as uint8."""
    if values == "trained":
        keys = np.asarray(rows, np.uint64)[:, None]
        columns = np.arange(config.head_dim, dtype=np.uint64)
        gauss = _gaussian(_mix(seed, layer_id, keys, columns), _mix(seed + 2, layer_id, keys, columns))
        magnitude = np.exp(0.5 * _gaussian(_mix(seed + 3, layer_id, keys), _mix(seed + 4, layer_id, keys)))
        blocks = (gauss * magnitude / 16).reshape(len(keys), config.head_dim // BLOCK, BLOCK)
        codes, scales = _to_fp8_blocks(blocks, (2,))
        return codes.reshape(len(keys), config.head_dim), scales
    keys = np.asarray(rows, np.uint64)[:, None]
    codes = _fp8(_mix(seed, layer_id, keys, np.arange(config.head_dim, dtype=np.uint64)))
    scales = 120 + (
        _mix(seed + 1, layer_id, keys, np.arange(config.head_dim // BLOCK, dtype=np.uint64)) % np.uint64(8)
    ).astype(np.uint8)
    return codes, scales


def float_rows_bytes(
    config: V41Config, layer_id: int, rows: np.ndarray, seed: int = 0, table_dtype: str = "BF16"
) -> np.ndarray:
    """The stored bytes [n, head_dim * itemsize] (uint8) of rows ``rows`` of a BF16 or F32 table: random
    sign and mantissa bits, exponents giving magnitudes in [2**-7, 2**1)."""
    rows = np.asarray(rows, np.uint64)[:, None]
    bits = _mix(seed, layer_id, rows, np.arange(config.head_dim, dtype=np.uint64))
    sign, exponent = bits >> np.uint64(63), np.uint64(120) + (bits >> np.uint64(32)) % np.uint64(8)
    f32 = (sign << np.uint64(31) | exponent << np.uint64(23) | bits & np.uint64(0x7FFFFF)).astype(np.uint32)
    stored = (f32 >> np.uint32(16)).astype(np.uint16) if table_dtype == "BF16" else f32
    return stored.view(np.uint8)


def _small_tensors(config: V41Config, layer_id: int, seed: int, values: str = "codes") -> dict[str, tuple[str, bytes]]:
    """The non-table tensors of a layer: suffix -> (dtype, bytes)."""
    rng = np.random.default_rng([seed, layer_id])
    expected = _expected(config, layer_id)
    out, width = expected["wkv.weight"][1]
    if values == "trained":
        blocks_out, blocks_in = expected["wkv.scale"][1]
        weights = rng.normal(0, width**-0.5, (blocks_out * BLOCK, blocks_in * BLOCK))
        codes, wkv_scale = _to_fp8_blocks(weights.reshape(blocks_out, BLOCK, blocks_in, BLOCK), (1, 3))
        wkv = np.ascontiguousarray(codes.reshape(blocks_out * BLOCK, blocks_in * BLOCK)[:out, :width])
    else:
        wkv = _fp8(rng.integers(0, 256, (out, width), dtype=np.uint8))
        wkv_scale = rng.integers(112, 118, expected["wkv.scale"][1], dtype=np.uint8)
    streams = (config.hc_mult, config.hidden_size)
    q, k = (torch.from_numpy(rng.normal(1, 0.2, streams)).bfloat16().view(torch.uint16).numpy() for _ in range(2))
    return {
        "wkv.weight": ("F8_E4M3", wkv.tobytes()),
        "wkv.scale": ("F8_E8M0", wkv_scale.tobytes()),
        "q_weight": ("BF16", q.tobytes()),
        "k_weight": ("BF16", k.tobytes()),
    }


def _write_shard(path: Path, small: dict[str, tuple[str, bytes, tuple]], large: dict[str, tuple[str, tuple, int]]):
    """A safetensors file: ``small`` tensors written, ``large`` ones (dtype, shape, nbytes) left as a
    hole sized with truncate. Returns each large tensor's absolute byte offset."""
    header, offset = {}, 0
    for name, (dtype, data, shape) in small.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    for name, (dtype, shape, nbytes) in large.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _, data, _ in small.values():
            f.write(data)
        f.truncate(start + offset)
    return {name: start + header[name]["data_offsets"][0] for name in large}


def write_v41_checkpoint(
    folder: str | Path,
    config: dict,
    seed: int = 0,
    rows: dict[int, np.ndarray] | None = None,
    prefix: str = "",
    tokenizer: bool = False,
    table_dtype: str = "F8_E4M3",
    values: str = "codes",
) -> Path:
    """Write a checkpoint folder for the V4.1 ``config`` (a ``config.json`` dict).

    ``rows``: layer id -> the table rows to write (default: every row, for small tables only).
    ``prefix``: ``"model."`` to store the tensors under it, as some exports do.
    ``table_dtype``: ``"F8_E4M3"`` (with an F8_E8M0 ``embed.scale``, as released), ``"BF16"`` or ``"F32"``.
    ``values``: ``"codes"`` or ``"trained"`` FP8 values (the module's docstring).
    """
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"table_dtype must be one of {TABLE_DTYPES}, got {table_dtype!r}")
    if values not in ("codes", "trained"):
        raise ValueError(f"values must be 'codes' or 'trained', got {values!r}")
    fp8 = table_dtype == "F8_E4M3"
    table_tensors = ("embed.scale", "embed.weight") if fp8 else ("embed.weight",)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parsed = V41Config.from_hf(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_word_tokenizer(folder / "tokenizer.json", parsed.vocab_size, parsed.compressed_vocab_size)
    weight_map = {}
    for index, layer_id in enumerate(parsed.layer_ids):
        shard = f"model-{index + 1:05d}-of-{len(parsed.layer_ids):05d}.safetensors"
        expected = _expected(parsed, layer_id)
        names = {
            suffix: f"{prefix}layers.{layer_id}.engram.{suffix}"
            for suffix in expected
            if fp8 or suffix != "embed.scale"
        }
        small = {
            names[s]: (dtype, data, expected[s][1])
            for s, (dtype, data) in _small_tensors(parsed, layer_id, seed, values).items()
        }
        dtypes = {"embed.scale": "F8_E8M0", "embed.weight": table_dtype}
        large = {
            names[s]: (dtypes[s], expected[s][1], math.prod(expected[s][1]) * DTYPE_BYTES[dtypes[s]])
            for s in table_tensors
        }
        offsets = _write_shard(folder / shard, small, large)
        wanted = np.arange(parsed.table_rows(layer_id)) if rows is None else np.unique(rows[layer_id])
        if fp8:
            codes, scales = table_rows_bytes(parsed, layer_id, wanted, seed, values)
            _write_rows(folder / shard, offsets[names["embed.scale"]], wanted, scales)
        else:
            codes = float_rows_bytes(parsed, layer_id, wanted, seed, table_dtype)
        _write_rows(folder / shard, offsets[names["embed.weight"]], wanted, codes)
        weight_map.update(dict.fromkeys(names.values(), shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    return folder


def _write_rows(path: Path, offset: int, rows: np.ndarray, data: np.ndarray) -> None:
    """Rows of a [R, W] tensor, ``data`` their bytes [n, W * itemsize], at ``offset``: all at once when they are
    every row, else one by one (each a small write into the hole)."""
    width = data.shape[1]
    fd = os.open(path, os.O_WRONLY)
    try:
        if len(rows) and rows[0] == 0 and np.all(np.diff(rows) == 1):
            os.pwrite(fd, data.tobytes(), offset)
        else:
            for row, values in zip(rows.tolist(), data, strict=True):
                os.pwrite(fd, values.tobytes(), offset + row * width)
    finally:
        os.close(fd)


def write_word_tokenizer(path: Path, vocab_size: int, compressed_size: int) -> Path:
    """A word-level ``tokenizer.json`` of ``vocab_size`` tokens that compresses to ``compressed_size``
    ids: ``w0 .. w{C-1}``, then upper-case copies ``W0 ..`` that normalize to the same keys."""
    words = [f"w{i}" for i in range(compressed_size)]
    words += [f"W{i}" for i in range(vocab_size - compressed_size)]
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0")).save(str(path))
    return path
