"""Real text and tokenizers: text as token ids, what calibration reads (static INT8 scales; which table rows are hot).

Text files are read as UTF-8 and tokenized with the model's own tokenizer (the config's
``tokenizer.json``), without special tokens, as one stream per file. Lookups depend only on the ids,
so calibrating on real prose gives the rows, and the spread of their values, that a server sees;
random ids give neither.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engram_export.core.errors import EngramError

__all__ = [
    "read_text",
    "token_pieces",
    "token_stream",
    "windows",
    "find_tokenizer_file",
    "read_tokenizer",
    "TokenPiece",
]

_PIECE_BYTES = 1 << 20  # text is read and tokenized in pieces of about this many bytes
_PIECES_AT_ONCE = 8  # pieces tokenized in one batch (the tokenizer spreads a batch over the cores)
_BREAKS = (b"\n\n", b"\n", b" ")  # a piece ends after the last of these it holds, in this order


@dataclasses.dataclass(frozen=True)
class TokenPiece:
    """A piece of a text file as token ids."""

    file: int  # index of the file in the paths given
    held_out: bool  # in the held-out part of the text
    ids: np.ndarray  # int64
    size: int  # bytes of text


def read_text(path: str | Path) -> str:
    """The text of ``path``, or a one-line error: missing, not UTF-8, or empty."""
    _check_file(path)
    text = "".join(piece for piece, _ in _text_pieces(Path(path), 0, None))
    if not text.strip():
        raise EngramError(f"text: {path} is empty")
    return text


def _check_file(path: str | Path) -> int:
    """The size of the text file ``path`` (it exists, is a file, is readable and not empty), or a one-line error."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError as exc:
        raise EngramError(f"text: {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise EngramError(f"text: {path} is a folder, not a text file") from exc
    except OSError as exc:
        raise EngramError(f"text: cannot read {path} ({exc.strerror})") from exc
    if size == 0:
        raise EngramError(f"text: {path} is empty")
    return size


def _piece_end(data: bytes) -> int:
    """Where a piece of ``data`` ends: after its last paragraph break, else line break, else space, else
    before its last character (which may be cut). These bytes never occur inside a UTF-8 character, and a
    cut at whitespace changes no token of a tokenizer that splits words on whitespace."""
    for mark in _BREAKS:
        at = data.rfind(mark)
        if at >= 0:
            return at + len(mark)
    if not data or data[-1] < 0x80:
        return len(data)
    end = len(data)
    while end > 1 and data[end - 1] & 0xC0 == 0x80:  # continuation bytes of the last character
        end -= 1
    return end - 1 if end > 1 else len(data)


def _text_pieces(path: Path, offset: int, held_out_from: int | None):
    """(text, held out) pieces of the file ``path``, whose first byte is byte ``offset`` of all the text.
    The held-out part starts at the last break before byte ``held_out_from`` of all the text."""
    with path.open("rb") as file:
        start, carry = 0, b""
        while True:
            data = carry + file.read(_PIECE_BYTES)
            last = len(data) < len(carry) + _PIECE_BYTES  # a short read: the end of the file
            end = len(data) if last else _piece_end(data)
            if held_out_from is not None and offset + start < held_out_from < offset + start + end:
                end = _piece_end(data[: held_out_from - offset - start]) or end
                held_out_from = offset + start + end  # where the held-out part really starts
            if end:
                try:
                    text = data[:end].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise EngramError(f"text: {path} is not UTF-8 (byte {start + exc.start}: {exc.reason})") from exc
                yield text, held_out_from is not None and offset + start >= held_out_from
            start, carry = start + end, data[end:]
            if last and not carry:
                return


def token_pieces(tokenizer_path: str | Path | None, paths: Sequence[str | Path], hold_out: float = 0.0):
    """Every file of ``paths`` tokenized by the tokenizer at ``tokenizer_path``, as ``TokenPiece``s in
    order, read and tokenized a few MB at a time (memory does not grow with the text). With ``hold_out``,
    the pieces from about that share of all the text's bytes from the end (cut at whitespace) are marked
    held out. Every file is checked (exists, readable, not empty) before any is tokenized."""
    if tokenizer_path is None:
        raise EngramError("text: this model's config has no tokenizer to turn text into ids")
    if not paths:
        raise EngramError("text: give at least one text file")
    sizes = [_check_file(path) for path in paths]
    tokenizer = read_tokenizer(tokenizer_path)
    tokenizer.no_truncation()  # a tokenizer.json made for a model cuts every text at its context length
    tokenizer.no_padding()
    total = sum(sizes)
    held_out_from = total - int(total * hold_out) if hold_out else None
    batch: list[tuple[int, str, bool]] = []

    def encoded():
        texts = [text for _, text, _ in batch]
        for (index, text, held), encoding in zip(
            batch, tokenizer.encode_batch_fast(texts, add_special_tokens=False), strict=True
        ):
            yield TokenPiece(index, held, np.asarray(encoding.ids, np.int64), len(text.encode()))

    offset = 0
    for index, path in enumerate(paths):
        blank = True
        for text, held in _text_pieces(Path(path), offset, held_out_from):
            blank = blank and not text.strip()
            batch.append((index, text, held))
            if len(batch) == _PIECES_AT_ONCE:
                yield from encoded()
                batch = []
        if blank:
            raise EngramError(f"text: {path} is empty")
        offset += sizes[index]
    yield from encoded()


def token_stream(tokenizer_path: str | Path | None, paths: Sequence[str | Path]) -> np.ndarray:
    """Every file of ``paths`` tokenized by the tokenizer at ``tokenizer_path``, as one int64 stream."""
    ids = [piece.ids for piece in token_pieces(tokenizer_path, paths)]
    stream = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if not len(stream):
        raise EngramError(f"text: {', '.join(map(str, paths))} gave no tokens")
    return stream


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


def windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """Up to ``count`` windows [n, length] of ``stream``, spread evenly over it (no two overlap)."""
    available = len(stream) // length
    if available < 1:
        raise EngramError(f"text: {len(stream)} tokens, fewer than one window of {length}")
    starts = np.linspace(0, available - 1, min(count, available)).astype(np.int64) * length
    return np.stack([stream[start : start + length] for start in starts])
