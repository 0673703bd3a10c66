"""The Engram configuration: the reference demo's EngramConfig and BackBoneConfig fields in one record.

A config is a JSON object whose keys are exactly the field names below (spec section 1). Presets ship
beside this module in ``presets/<name>.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from engram_export.errors import EngramError

__all__ = ["EngramConfig", "load_config", "preset_names"]

PRESET_DIR = Path(__file__).parent / "presets"


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
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise EngramError(f"config: {message}")

        for name in ("max_ngram_size", "n_embed_per_ngram", "n_head_per_ngram", "kernel_size",
                     "hidden_size", "hc_mult", "vocab_size", "pad_id", "seed"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool),
                    f"{name} must be an integer, got {value!r}")
        require(self.max_ngram_size >= 2, f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        require(len(self.engram_vocab_size) == self.max_ngram_size - 1,
                f"engram_vocab_size needs one entry per n-gram order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1}), got {len(self.engram_vocab_size)}")
        require(all(isinstance(v, int) and v >= 2 for v in self.engram_vocab_size),
                f"engram_vocab_size entries must be integers >= 2, got {list(self.engram_vocab_size)}")
        require(self.n_head_per_ngram >= 1 and self.n_embed_per_ngram % self.n_head_per_ngram == 0,
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be a positive multiple of "
                f"n_head_per_ngram ({self.n_head_per_ngram})")
        for name in ("kernel_size", "hidden_size", "hc_mult", "vocab_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(len(self.layer_ids) >= 1 and len(set(self.layer_ids)) == len(self.layer_ids)
                and all(isinstance(i, int) and i >= 0 for i in self.layer_ids),
                f"layer_ids must be distinct non-negative integers, got {list(self.layer_ids)}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(self.tokenizer is None or isinstance(self.tokenizer, str),
                f"tokenizer must be a path or null, got {self.tokenizer!r}")
        if self.tokenizer is None:
            require(0 <= self.pad_id < self.vocab_size,
                    f"pad_id {self.pad_id} is outside [0, vocab_size={self.vocab_size})")

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

    def replace(self, **changes: Any) -> "EngramConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["engram_vocab_size"] = list(self.engram_vocab_size)
        data["layer_ids"] = list(self.layer_ids)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> "EngramConfig":
        """Build a config from a JSON object; a relative tokenizer path is taken from ``base_dir``."""
        if not isinstance(data, dict):
            raise EngramError(f"config: expected a JSON object, got {type(data).__name__}")
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


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> EngramConfig:
    """Load a preset by name (``tiny``, ``deepseek-demo``) or a JSON config file by path."""
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in preset_names():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise EngramError(f"config: {name_or_path} is neither a preset ({', '.join(preset_names())}) "
                          f"nor a readable JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngramError(f"config: {path} is not valid JSON ({exc})") from None
    return EngramConfig.from_dict(data, base_dir=path.parent)
