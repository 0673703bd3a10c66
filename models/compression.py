"""Tokenizer compression (spec section 2): merge token ids whose decoded text differs only in form."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from engram_export.core.text import find_tokenizer_file, read_tokenizer

__all__ = ["build_compression_table", "tokenizer_size"]

_SENTINEL = "\ue000"  # keeps a text that is exactly one space from being stripped away


def tokenizer_size(path: str | Path) -> int:
    """How many ids the tokenizer has, added tokens included: the compression table's length."""
    return read_tokenizer(path).get_vocab_size(with_added_tokens=True)


def _normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def build_compression_table(path: str | Path) -> np.ndarray:
    """old id -> new id (int64) over every id of the tokenizer, added tokens included.

    New ids are handed out in first-seen order of the normalized keys; a token whose decoded text holds
    U+FFFD (a partial UTF-8 byte sequence) is keyed by its raw token string instead. Built once per
    version of the file (a model's layers and its reference share one tokenizer; a Python loop over
    every id); each call gets its own copy.
    """
    file = find_tokenizer_file(path).resolve()
    stat = file.stat()
    return _compression_table(file, stat.st_mtime_ns, stat.st_size).copy()


@functools.lru_cache(maxsize=4)
def _compression_table(file: Path, mtime_ns: int, size: int) -> np.ndarray:
    tokenizer = read_tokenizer(file)
    normalizer = _normalizer()
    key_to_new: dict[str, int] = {}
    lut = np.empty(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token_id in range(len(lut)):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.id_to_token(token_id)
        else:
            key = normalizer.normalize_str(text) or text
        lut[token_id] = key_to_new.setdefault(key, len(key_to_new))
    return lut
