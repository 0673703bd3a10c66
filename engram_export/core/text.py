"""Real text and tokenizers: text as token ids, what calibration reads (static INT8 scales; which table rows are hot).

Text files are read as UTF-8 and tokenized with the model's own tokenizer (the config's
``tokenizer.json``), without special tokens, as one stream per file. Lookups depend only on the ids,
so calibrating on real prose gives the rows, and the spread of their values, that a server sees;
random ids give neither.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engram_export.core.errors import EngramError

__all__ = ["read_text", "token_stream", "windows", "find_tokenizer_file", "read_tokenizer"]

_BATCH_CHARS = 1 << 20  # tokenize a file in pieces of about this many characters, on paragraph breaks


def read_text(path: str | Path) -> str:
    """The text of ``path``, or a one-line error: missing, not UTF-8, or empty."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise EngramError(f"text: {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise EngramError(f"text: {path} is a folder, not a text file") from exc
    except UnicodeDecodeError as exc:
        raise EngramError(f"text: {path} is not UTF-8 (byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise EngramError(f"text: cannot read {path} ({exc.strerror})") from exc
    if not text.strip():
        raise EngramError(f"text: {path} is empty")
    return text


def _pieces(text: str) -> list[str]:
    """``text`` cut on paragraph breaks into pieces of about ``_BATCH_CHARS`` (a fast batch encode;
    a cut between paragraphs changes no token)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + _BATCH_CHARS)
        end = len(text) if end < 0 else end + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def find_tokenizer_file(path: str | Path) -> Path:
    """A ``tokenizer.json`` path, or a directory that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise EngramError(f"tokenizer: {path} does not exist (give a tokenizer.json or its folder)")
    return path


def read_tokenizer(path: str | Path):
    """The ``tokenizers.Tokenizer`` at ``path`` (a tokenizer.json or its folder), or a one-line error."""
    file = find_tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise EngramError(f"tokenizer: cannot read {file}: {exc}") from exc


def token_stream(tokenizer_path: str | Path | None, paths: list[str | Path]) -> np.ndarray:
    """Every file of ``paths`` tokenized by the tokenizer at ``tokenizer_path``, as one int64 stream."""
    if tokenizer_path is None:
        raise EngramError("text: this model's config has no tokenizer to turn text into ids")
    if not paths:
        raise EngramError("text: give at least one text file")
    tokenizer = read_tokenizer(tokenizer_path)
    tokenizer.no_truncation()  # a tokenizer.json made for a model cuts every text at its context length
    tokenizer.no_padding()
    ids = []
    for path in paths:
        text = read_text(path)
        for encoding in tokenizer.encode_batch(_pieces(text), add_special_tokens=False):
            ids.append(np.asarray(encoding.ids, np.int64))
    stream = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if not len(stream):
        raise EngramError(f"text: {', '.join(map(str, paths))} gave no tokens")
    return stream


def windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """Up to ``count`` windows [n, length] of ``stream``, spread evenly over it (no two overlap)."""
    available = len(stream) // length
    if available < 1:
        raise EngramError(f"text: {len(stream)} tokens, fewer than one window of {length}")
    starts = np.linspace(0, available - 1, min(count, available)).astype(np.int64) * length
    return np.stack([stream[start : start + length] for start in starts])
