"""Lookup counts on real text equal a brute-force count of the model's own hash rows."""

from __future__ import annotations

import collections

import numpy as np

from engram_export import load_config
from engram_export.core.text import token_stream
from engram_export.folders import calibration
from engram_export.measure import concentration
from engram_export.models.compression import build_compression_table
from engram_export.models.deepseek_v41_config import V41Config, V41Hashing
from tests.v41_spec import TINY

PROSE = (
    "Engram adds a conditional memory to a Transformer: hashed n-gram embeddings looked up in constant "
    "time, gated by the hidden state. The table is the product; its lookups follow the distribution of "
    "language, so a few rows are read all the time and most almost never. "
) * 40


def test_counts_equal_a_brute_force_count(tokenizer_json, tmp_path, monkeypatch):
    lut = build_compression_table(str(tokenizer_json))
    config = V41Config.from_hf(
        {
            **TINY,
            "vocab_size": len(lut),
            "engram_compressed_vocab_size": int(lut.max()) + 1,
            "tokenizer": str(tokenizer_json),
        }
    )
    (tmp_path / "prose.txt").write_text(PROSE)
    stream = token_stream(config.tokenizer, [tmp_path / "prose.txt"])
    hashing = V41Hashing(config)
    monkeypatch.setattr(calibration, "_WINDOW", 100)  # windows hashed with the tokens before them
    monkeypatch.setattr(calibration, "_BATCH", 512)  # several sorted runs, merged
    counts = concentration.row_counts(hashing, config, 3, stream)
    expected: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    rows = hashing.rows(stream[None], np.ones((1, len(stream)), bool), 3)[0]  # the stream at once
    for column in range(rows.shape[1]):
        expected[2 + column // config.n_head_per_ngram].update(rows[:, column].tolist())
    assert sorted(counts) == [2, 3]
    for order, (rows, seen) in counts.items():
        assert dict(zip(rows.tolist(), seen.tolist(), strict=True)) == dict(expected[order])
        assert list(rows) == sorted(rows)
    shares = concentration.top_shares(counts[2][1])
    assert 0 < shares[0] <= shares[1] <= shares[2] <= 1
    assert concentration.held_out_coverage(counts[2][0], *counts[2]) == 1.0


def test_the_demo_family_counts_too():
    config = load_config("tiny")
    from engram_export.models.hashing import EngramHashing

    stream = np.random.default_rng(0).integers(0, config.vocab_size, 500)
    counts = concentration.row_counts(EngramHashing(config), config, 1, stream)
    assert sum(int(c.sum()) for _, c in counts.values()) == 500 * config.num_heads


def test_the_sample_prints_the_table(tmp_path, monkeypatch, capsys):
    """``samples/concentration.py`` on a small text (the docs quote its run on every installed
    package's description and the fortunes)."""
    import runpy
    import sys
    from pathlib import Path

    (tmp_path / "prose.txt").write_text(PROSE)
    sample = Path(__file__).parents[1] / "samples" / "concentration.py"
    monkeypatch.setattr(sys, "argv", [str(sample), str(tmp_path / "prose.txt")])
    runpy.run_path(str(sample), run_name="__main__")
    out = capsys.readouterr().out
    assert "layer 14, released table layout (384,016,682 rows)" in out
    for order in ("2-gram", "3-gram", "4-gram"):
        assert order in out
