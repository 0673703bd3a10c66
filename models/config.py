"""The Engram configuration: the reference demo's EngramConfig and BackBoneConfig fields in one record.

A config is a JSON object whose keys are exactly the field names below (spec section 1). Presets ship
beside this module in ``presets/<name>.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from engram_export.core.errors import EngramError

__all__ = ["EngramConfig", "load_config", "check_tokenizer", "preset_names", "config_from_dict", "is_deepseek_v41"]

PRESET_DIR = Path(__file__).parent / "presets"

# Inclusive bounds of the integer fields (list fields: of each entry). They admit the demo (spec section
# 1), DeepSeek-V4.1 (2..4-grams, 8 heads of 256, hidden 5120, 129280 ids) and any plausible model with
# room to spare, and refuse what could only be a typo before it costs memory or minutes of work.
BOUNDS = {
    "max_ngram_size": (2, 8),  # the paper uses 2..4-grams; longer n-grams are too sparse to learn
    "n_head_per_ngram": (1, 64),
    "n_embed_per_ngram": (1, 2**16),
    "kernel_size": (1, 64),
    "hidden_size": (1, 2**16),
    "hc_mult": (1, 64),
    # real tokenizers have up to ~2**18 ids; with no tokenizer the compression table is an int64
    # identity over vocab_size ids, 128 MiB at this bound
    "vocab_size": (1, 2**24),
    "pad_id": (0, 2**24 - 1),
    "seed": (0, 2**63 - 1),  # numpy's default_rng takes any non-negative int; int64 fits every store
    "engram_vocab_size": (2, 2**31 - 1),
    "layer_ids": (0, 9999),
}
# The hash kernel emits i32 rows up to here and i64 above, which OpenVINO's CPU plugin may compute in
# i32 (spec section 7) and no test here can cover (such a table at head_dim 64 is 512 GiB). Each head's
# prime exceeds its order's engram_vocab_size, so n_head_per_ngram * sum(engram_vocab_size) is a lower
# bound of the rows; EngramHashing checks the exact sum of the primes.
MAX_TABLE_ROWS = 2**31 - 1
# One prime per head per layer, about 25 us each to find: this keeps EngramHashing under a second.
MAX_HEAD_PRIMES = 2**15
# Names a DeepSeek-V4.1 checkpoint gives two fields: in a demo-family config, refused in one line that
# names the field to use (both families' configs say pad_id and n_head_per_ngram, as the demo does).
CHECKPOINT_NAMES = {
    "pad_token_id": "pad_id",
    "engram_pad_token_id": "pad_id",
    "n_heads": "n_head_per_ngram",
    "engram_n_heads": "n_head_per_ngram",
}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class EngramConfig:
    """Hyper-parameters of every Engram layer of one model (names as in the reference demo)."""

    engram_vocab_size: tuple[int, ...]
    max_ngram_size: int
    n_embed_per_ngram: int
    n_head_per_ngram: int
    layer_ids: tuple[int, ...]
    pad_id: int
    seed: int
    kernel_size: int
    hidden_size: int
    hc_mult: int
    vocab_size: int
    tokenizer: str | None

    def __post_init__(self):
        """Refuse a config that is wrong or absurd before any work (types first, so no TypeError)."""

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise EngramError(f"config: {message}")

        def integer(name: str, value: Any, low: int, high: int) -> None:
            require(
                is_int(value) and low <= value <= high, f"{name} must be an integer in [{low}, {high}], got {value!r}"
            )

        for name in (
            "max_ngram_size",
            "n_embed_per_ngram",
            "n_head_per_ngram",
            "kernel_size",
            "hidden_size",
            "hc_mult",
            "vocab_size",
            "pad_id",
            "seed",
        ):
            integer(name, getattr(self, name), *BOUNDS[name])
        for name in ("engram_vocab_size", "layer_ids"):
            value = getattr(self, name)
            require(
                isinstance(value, (list, tuple)) and len(value) >= 1,
                f"{name} must be a non-empty list of integers, got {value!r}",
            )
            for i, item in enumerate(value):
                integer(f"{name}[{i}]", item, *BOUNDS[name])
        require(
            len(self.engram_vocab_size) == self.max_ngram_size - 1,
            f"engram_vocab_size needs one entry per n-gram order 2..{self.max_ngram_size} "
            f"({self.max_ngram_size - 1}), got {len(self.engram_vocab_size)}",
        )
        require(
            self.n_embed_per_ngram % self.n_head_per_ngram == 0,
            f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be a multiple of "
            f"n_head_per_ngram ({self.n_head_per_ngram})",
        )
        require(
            len(set(self.layer_ids)) == len(self.layer_ids), f"layer_ids must be distinct, got {list(self.layer_ids)}"
        )
        rows = self.n_head_per_ngram * sum(self.engram_vocab_size)
        require(
            rows <= MAX_TABLE_ROWS,
            f"engram_vocab_size {list(self.engram_vocab_size)} x n_head_per_ngram "
            f"{self.n_head_per_ngram} makes a table of at least {rows} rows, at most {MAX_TABLE_ROWS}",
        )
        primes = len(self.layer_ids) * self.num_heads
        require(
            primes <= MAX_HEAD_PRIMES,
            f"{len(self.layer_ids)} layer_ids x {self.num_heads} heads need {primes} head primes, "
            f"at most {MAX_HEAD_PRIMES}",
        )
        require(
            self.tokenizer is None or isinstance(self.tokenizer, str),
            f"tokenizer must be a path or null, got {self.tokenizer!r}",
        )
        if self.tokenizer is None:  # with a tokenizer, load_config checks pad_id against its size
            require(self.pad_id < self.vocab_size, f"pad_id {self.pad_id} is outside [0, vocab_size={self.vocab_size})")

    @property
    def num_hidden_layers(self) -> None:
        """The backbone's layers: the demo's config does not say (a V4.1 checkpoint's does)."""
        return None

    @property
    def head_dim(self) -> int:
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def num_heads(self) -> int:
        """H: hash heads over all n-gram orders."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def engram_hidden_size(self) -> int:
        """E: width of the flattened embedding, the projections' input."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    def replace(self, **changes: Any) -> EngramConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["engram_vocab_size"] = list(self.engram_vocab_size)
        data["layer_ids"] = list(self.layer_ids)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> EngramConfig:
        """Build a config from a JSON object; a relative tokenizer path is taken from ``base_dir``."""
        if not isinstance(data, dict):
            raise EngramError(f"config: expected a JSON object, got {type(data).__name__}")
        renamed = [f"{key} is called {CHECKPOINT_NAMES[key]}" for key in data if key in CHECKPOINT_NAMES]
        if renamed:
            raise EngramError(f"config: {'; '.join(renamed)} (a config without model_type has the demo's names)")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise EngramError(f"config: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise EngramError(f"config: unknown field(s) {', '.join(unknown)}")
        values = dict(data)
        for name in ("engram_vocab_size", "layer_ids"):
            if not isinstance(values[name], (list, tuple)):
                raise EngramError(f"config: {name} must be a list, got {values[name]!r}")
            values[name] = tuple(values[name])
        tokenizer = values["tokenizer"]
        if isinstance(tokenizer, str) and base_dir is not None and not Path(tokenizer).is_absolute():
            values["tokenizer"] = str(base_dir / tokenizer)
        return cls(**values)


def is_deepseek_v41(config) -> bool:
    """Whether ``config`` is of the DeepSeek-V4.1 family (a ``V41Config``), not the demo's."""
    return getattr(config, "model_type", None) is not None


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None):
    """The config of either family: DeepSeek-V4.1 (``model_type`` deepseek_v41, its ``config.json``
    fields) or the reference demo (the demo's field names)."""
    if isinstance(data, dict) and "model_type" in data:
        from engram_export.models.deepseek_v41_config import V41Config

        return V41Config.from_hf(data, base_dir)
    return EngramConfig.from_dict(data, base_dir)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(name_or_path: str | Path):
    """Load a preset by name (``tiny``, ``deepseek-demo``, ``deepseek-v41``, ``v41-tiny``) or a JSON
    config file by path: an ``EngramConfig``, or a ``V41Config`` for a DeepSeek-V4.1 config."""
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in preset_names():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise EngramError(
            f"config: {name_or_path} is neither a preset ({', '.join(preset_names())}) nor a readable JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngramError(f"config: {path} is not valid JSON ({exc})") from exc
    config = config_from_dict(data, base_dir=path.parent)
    if isinstance(config, EngramConfig):
        check_tokenizer(config)
    return config


def check_tokenizer(config: EngramConfig) -> None:
    """Refuse a missing or unreadable tokenizer, or a pad_id past its ids, when the config is read.

    Only reads the tokenizer (fast), no compression table. Not in ``__post_init__``: configs stored in
    exported models are read back where the tokenizer file may not be (the table travels in the model).
    """
    if config.tokenizer is None:
        return
    from engram_export.models.compression import tokenizer_size

    size = tokenizer_size(config.tokenizer)
    if config.pad_id >= size:
        raise EngramError(f"config: pad_id {config.pad_id} is outside the tokenizer's {size} ids ({config.tokenizer})")
