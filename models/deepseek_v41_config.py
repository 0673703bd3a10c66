"""DeepSeek-V4.1's Engram (model_type ``deepseek_v41``, spec section 8) without PyTorch: the config,
the hash, the stored forms of its tables (FP8 E4M3 codes, E8M0 scales) and where a checkpoint keeps a
layer's tensors. A runtime or a shard needs these and never the PyTorch layer (``deepseek_v41.py``),
so importing them loads no PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from engram_export.core.errors import EngramError
from engram_export.models.primes import INT64_MAX, LAYER_SEED_STRIDE, _next_prime

__all__ = [
    "V41Config",
    "V41Hashing",
    "hash_rows_v41",
    "head_primes",
    "e4m3_values",
    "e8m0_values",
    "BLOCK",
    "GATE_FLOOR",
    "MODEL_TYPE",
    "locate_layer",
    "TENSORS",
    "TABLE_DTYPES",
]

MODEL_TYPE = "deepseek_v41"
BLOCK = 32  # values per E8M0 scale: along a table row, and 32x32 blocks of wkv
GATE_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class V41Config:
    """The Engram fields of a DeepSeek-V4.1 ``config.json``, plus the tokenizer that builds the
    compression table.

    Fields that mean what a field of the demo family's ``EngramConfig`` means carry its name, so that
    code shared by the families reads one attribute and never asks which family it holds: ``pad_id``
    and ``n_head_per_ngram`` (DeepSeek's demo and the spec name them so; the checkpoint says
    ``engram_pad_token_id`` and ``engram_n_heads``), ``vocab_size`` for the backbone's token ids and
    ``engram_vocab_size`` for where the head primes start (one value for every order, where the demo
    has one per order), ``num_heads`` and ``engram_hidden_size``. The checkpoint's keys are read and
    written in one place, ``CHECKPOINT_KEYS``.
    """

    layer_ids: tuple[int, ...]
    num_embeddings: tuple[int, ...]  # table rows per layer: the sum of its head primes
    max_ngram_size: int
    engram_vocab_size: int  # where the head primes start
    n_head_per_ngram: int
    head_dim: int
    pad_id: int  # the raw id (before compression) of the pad
    compressed_vocab_size: int
    hc_mult: int
    hidden_size: int
    rms_norm_eps: float
    vocab_size: int  # the backbone's token ids
    tokenizer: str | None = None
    num_hidden_layers: int | None = None  # the backbone's layers, where the checkpoint says

    # the checkpoint's config.json key -> the field
    CHECKPOINT_KEYS = {
        "engram_layer_ids": "layer_ids",
        "engram_num_embeddings": "num_embeddings",
        "engram_max_ngram_size": "max_ngram_size",
        "engram_vocab_size": "engram_vocab_size",
        "engram_n_heads": "n_head_per_ngram",
        "engram_head_dim": "head_dim",
        "engram_pad_token_id": "pad_id",
        "engram_compressed_vocab_size": "compressed_vocab_size",
        "hc_mult": "hc_mult",
        "hidden_size": "hidden_size",
        "rms_norm_eps": "rms_norm_eps",
        "vocab_size": "vocab_size",
    }

    def __post_init__(self):
        """Refuse a config that is wrong or absurd, naming the checkpoint's key (the one users write)."""
        key = {name: key for key, name in self.CHECKPOINT_KEYS.items()}

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise EngramError(f"config: {message}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        bounds = {
            "max_ngram_size": (2, 8),
            "engram_vocab_size": (2, 2**31 - 1),
            "n_head_per_ngram": (1, 64),
            "head_dim": (BLOCK, 2**14),
            "pad_id": (0, 2**24 - 1),
            "compressed_vocab_size": (1, 2**24),
            "hc_mult": (1, 64),
            "hidden_size": (1, 2**16),
            "vocab_size": (1, 2**24),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            require(
                is_int(value) and low <= value <= high,
                f"{key[name]} must be an integer in [{low}, {high}], got {value!r}",
            )
        require(self.head_dim % BLOCK == 0, f"engram_head_dim {self.head_dim} must be a multiple of {BLOCK}")
        for name in ("layer_ids", "num_embeddings"):
            values = getattr(self, name)
            require(
                isinstance(values, tuple) and values and all(is_int(v) and 0 <= v < 2**31 for v in values),
                f"{key[name]} must be a list of integers in [0, 2**31), got {values!r}",
            )
        require(len(set(self.layer_ids)) == len(self.layer_ids), f"engram_layer_ids repeat: {self.layer_ids}")
        require(
            len(self.num_embeddings) == len(self.layer_ids),
            f"engram_num_embeddings needs one entry per layer ({len(self.layer_ids)}), got {len(self.num_embeddings)}",
        )
        require(
            isinstance(self.rms_norm_eps, (int, float))
            and not isinstance(self.rms_norm_eps, bool)
            and 0 < self.rms_norm_eps < 1,
            f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}",
        )
        require(
            self.num_hidden_layers is None
            or (is_int(self.num_hidden_layers) and max(self.layer_ids) < self.num_hidden_layers <= 4096),
            f"num_hidden_layers must be an integer in ({max(self.layer_ids)}, 4096] (past every Engram layer), "
            f"got {self.num_hidden_layers!r}",
        )
        require(
            self.tokenizer is None or isinstance(self.tokenizer, str),
            f"tokenizer must be a path or null, got {self.tokenizer!r}",
        )

    model_type = MODEL_TYPE

    @property
    def num_heads(self) -> int:
        """H: hash heads over all n-gram orders, the rows looked up per token (24 released)."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def engram_hidden_size(self) -> int:
        """E: width of the concatenated rows, the projection's input (6144 released)."""
        return self.num_heads * self.head_dim

    @property
    def projection_width(self) -> int:
        """Rows of ``wkv``: a key per stream and one shared value."""
        return self.hidden_size * (self.hc_mult + 1)

    def table_rows(self, layer_id: int) -> int:
        return self.num_embeddings[self.layer_ids.index(layer_id)]

    @classmethod
    def from_hf(cls, data: dict[str, Any], base_dir: Path | None = None) -> V41Config:
        """From a checkpoint's ``config.json`` (its ``engram_*`` and backbone keys, ``CHECKPOINT_KEYS``)."""
        if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
            raise EngramError(
                f"config: model_type must be {MODEL_TYPE!r}, got "
                f"{data.get('model_type') if isinstance(data, dict) else data!r}"
            )
        missing = [key for key in cls.CHECKPOINT_KEYS if key not in data]
        if missing:
            raise EngramError(f"config: missing field(s) {', '.join(missing)}")
        values = {name: data[key] for key, name in cls.CHECKPOINT_KEYS.items()}
        for key in ("engram_layer_ids", "engram_num_embeddings"):
            name = cls.CHECKPOINT_KEYS[key]
            if not isinstance(values[name], list):
                raise EngramError(f"config: {key} must be a list, got {values[name]!r}")
            values[name] = tuple(values[name])
        tokenizer = data.get("tokenizer")
        if isinstance(tokenizer, str) and base_dir is not None and not Path(tokenizer).is_absolute():
            tokenizer = str(base_dir / tokenizer)
        return cls(**values, tokenizer=tokenizer, num_hidden_layers=data.get("num_hidden_layers"))

    @classmethod
    def from_checkpoint(cls, checkpoint) -> V41Config:
        """From a checkpoint folder's ``config.json`` and ``tokenizer.json`` (required: without it the
        ids could not be compressed as the model was trained)."""
        tokenizer = checkpoint.folder / "tokenizer.json"
        if not tokenizer.is_file():
            raise EngramError(
                f"checkpoint: {checkpoint.folder} has no tokenizer.json (it builds the "
                f"compression table every hash depends on)"
            )
        return cls.from_hf({**checkpoint.config, "tokenizer": str(tokenizer.resolve())})

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model_type": MODEL_TYPE}
        data.update(
            {
                key: list(getattr(self, name)) if isinstance(getattr(self, name), tuple) else getattr(self, name)
                for key, name in self.CHECKPOINT_KEYS.items()
            }
        )
        data["tokenizer"] = self.tokenizer
        if self.num_hidden_layers is not None:
            data["num_hidden_layers"] = self.num_hidden_layers
        return data


def e4m3_values() -> np.ndarray:
    """float32 value of every E4M3 (fn) byte: the 256-entry decode table (0x7F, 0xFF: NaN, the mantissa
    bits kept as a widening conversion keeps them: PyTorch's bits, checked in tests/test_deepseek_v41.py)."""
    codes = np.arange(256, dtype=np.uint32)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * np.exp2(exponent - 7.0))
    values = np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)
    nan = (exponent == 15) & (mantissa == 7)
    values.view(np.uint32)[nan] = ((codes[nan] & 0x80) << 24) | 0x7F800000 | (mantissa[nan] << 20)
    return values


def e8m0_values() -> np.ndarray:
    """float32 value of every E8M0 byte: 2 ** (byte - 127), NaN for 0xFF."""
    return np.append(np.ldexp(1.0, np.arange(255) - 127), np.nan).astype(np.float32)


def head_primes(engram_vocab_size: int, max_ngram_size: int, n_head_per_ngram: int, layers: int) -> list[list[int]]:
    """Each layer's head primes (orders 2..N, ``n_head_per_ngram`` each), the smallest unused primes above
    ``engram_vocab_size`` - 1 in layer order: a layer's table has their sum of rows (``engram_num_embeddings``)."""
    seen: set[int] = set()
    by_layer = []
    for _ in range(layers):
        primes = []
        for _ in range(2, max_ngram_size + 1):
            candidate = engram_vocab_size - 1
            for _ in range(n_head_per_ngram):
                candidate = _next_prime(candidate, seen)
                seen.add(candidate)
                primes.append(candidate)
        by_layer.append(primes)
    return by_layer


def hash_rows_v41(
    ids: np.ndarray, token_mask: np.ndarray, multipliers, primes, pad_id: int, n_head_per_ngram: int
) -> np.ndarray:
    """Reference kernel: compressed ids [B,T] and token mask [B,T] -> table rows [B,T,C], int64.

    Looking back s = 0..N-1 tokens from t, a token is ``pad_id`` (the compressed pad) once any of t,
    t-1, .., t-s is before the sequence or an image token (mask False): image tokens block n-grams.
    """
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(token_mask, dtype=bool)
    before = len(multipliers) - 1
    padded_ids = np.concatenate([np.full((ids.shape[0], before), pad_id, np.int64), ids], axis=1)
    padded_mask = np.concatenate([np.zeros((ids.shape[0], before), bool), mask], axis=1)
    length, offsets = ids.shape[1], np.concatenate([[0], np.cumsum(primes)[:-1]]).astype(np.int64)
    blocked, rolling = np.zeros(ids.shape, bool), np.zeros(ids.shape, np.int64)
    columns = []
    for s, multiplier in enumerate(np.asarray(multipliers, dtype=np.int64)):
        blocked |= ~padded_mask[:, before - s : before - s + length]
        token = np.where(blocked, pad_id, padded_ids[:, before - s : before - s + length])
        product = token * multiplier
        rolling = np.bitwise_xor(rolling, product)  # 0 ^ x = x: the first look-back starts it
        if s >= 1:
            columns += [rolling % prime for prime in primes[(s - 1) * n_head_per_ngram : s * n_head_per_ngram]]
    return np.stack(columns, axis=2) + offsets


@dataclasses.dataclass(frozen=True)
class V41Hashing:
    """The compression table, multipliers and head primes of every layer, derived from the config."""

    config: V41Config

    @cached_property
    def lut(self) -> np.ndarray:
        """Raw id -> compressed id. Without a tokenizer, ids are taken as already compressed."""
        config = self.config
        if config.tokenizer is None:
            return np.arange(config.compressed_vocab_size, dtype=np.int64)
        from engram_export.models.compression import build_compression_table

        lut = build_compression_table(config.tokenizer)
        if int(lut.max()) + 1 != config.compressed_vocab_size:
            raise EngramError(
                f"config: the tokenizer compresses to {int(lut.max()) + 1} ids, "
                f"engram_compressed_vocab_size says {config.compressed_vocab_size} "
                f"(another tokenizer? every hash would change)"
            )
        return lut

    @cached_property
    def pad_id(self) -> int:
        """The compressed pad id (as the demo's hashing names it)."""
        if self.config.pad_id >= len(self.lut):
            raise EngramError(
                f"config: engram_pad_token_id {self.config.pad_id} is outside the tokenizer's {len(self.lut)} ids"
            )
        return int(self.lut[self.config.pad_id])

    def multipliers(self, layer_id: int) -> list[int]:
        self._check_layer(layer_id)
        high = (int(INT64_MAX) // self.config.compressed_vocab_size) // 2
        drawn = np.random.default_rng(LAYER_SEED_STRIDE * layer_id).integers(
            0, high, size=self.config.max_ngram_size, dtype=np.int64
        )
        return [int(m) for m in drawn * 2 + 1]

    @cached_property
    def _primes_by_layer(self) -> dict[int, list[int]]:
        config = self.config
        per_layer = head_primes(
            config.engram_vocab_size, config.max_ngram_size, config.n_head_per_ngram, len(config.layer_ids)
        )
        by_layer = dict(zip(config.layer_ids, per_layer, strict=True))
        for (layer_id, primes), rows in zip(by_layer.items(), config.num_embeddings, strict=True):
            if sum(primes) != rows:
                raise EngramError(
                    f"config: layer {layer_id}'s head primes sum to {sum(primes)}, engram_num_embeddings says {rows}"
                )
        return by_layer

    def primes(self, layer_id: int) -> list[int]:
        self._check_layer(layer_id)
        return list(self._primes_by_layer[layer_id])

    def rows(self, input_ids: np.ndarray, token_mask: np.ndarray, layer_id: int) -> np.ndarray:
        """Table rows [B,T,C] of raw ids [B,T]."""
        return hash_rows_v41(
            self.lut[input_ids],
            token_mask,
            self.multipliers(layer_id),
            self.primes(layer_id),
            self.pad_id,
            self.config.n_head_per_ngram,
        )

    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self.config.layer_ids:
            raise EngramError(
                f"layer {layer_id} is not an Engram layer (engram_layer_ids: {list(self.config.layer_ids)})"
            )


TENSORS = ("embed.weight", "embed.scale", "wkv.weight", "wkv.scale", "q_weight", "k_weight")
TABLE_DTYPES = ("F8_E4M3", "BF16", "F32")  # embed.scale exists for (and only for) an F8_E4M3 table


def _expected(config: V41Config, layer_id: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Checkpoint tensor -> (accepted dtypes, shape). ``embed.scale`` is only there for an FP8 table."""
    rows, out, width = config.table_rows(layer_id), config.projection_width, config.engram_hidden_size
    streams = (config.hc_mult, config.hidden_size)
    return {
        "embed.weight": (TABLE_DTYPES, (rows, config.head_dim)),
        "embed.scale": (("F8_E8M0",), (rows, config.head_dim // BLOCK)),
        "wkv.weight": (("F8_E4M3",), (out, width)),
        "wkv.scale": (("F8_E8M0",), (math.ceil(out / BLOCK), math.ceil(width / BLOCK))),
        "q_weight": (("BF16", "F32"), streams),
        "k_weight": (("BF16", "F32"), streams),
    }


def locate_layer(checkpoint, config: V41Config, layer_id: int) -> dict:
    """Where each of the layer's tensors is (``checkpoint.TensorLocation``), checked against the
    config: names with or without ``model.``, dtypes, shapes. Nothing is read but shard headers."""
    V41Hashing(config)._check_layer(layer_id)
    located: dict = {}
    for suffix, (dtypes, shape) in _expected(config, layer_id).items():
        names = [f"layers.{layer_id}.engram.{suffix}", f"model.layers.{layer_id}.engram.{suffix}"]
        if suffix == "embed.scale" and located["embed.weight"].dtype != "F8_E4M3":
            try:
                found = checkpoint.find(names)
            except EngramError:
                continue  # a float table has no scales
            table = located["embed.weight"]
            raise EngramError(
                f"checkpoint: {table.name} is {table.dtype}, which takes no scales, but the "
                f"checkpoint also holds {found}"
            )
        name = checkpoint.find(names)
        location = checkpoint.locate(name)
        if location.dtype not in dtypes:
            raise EngramError(f"checkpoint: {name} is {location.dtype}, expected {' or '.join(dtypes)}")
        if location.shape != shape:
            raise EngramError(f"checkpoint: {name} has shape {list(location.shape)}, the config expects {list(shape)}")
        located[suffix] = location
    return located
