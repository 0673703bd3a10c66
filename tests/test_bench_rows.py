"""``engram-export bench rows`` at a tiny size: a WordPiece tokenizer of 2,000 ids trained here on the
bench's own text makes V4.1 tables of about 50k rows a layer (24 x its compressed vocabulary), timed with
a few calls. Every store, form and shape has its row, the numbers are sane, and rows that differ from
numpy's gather of the checkpoint's rows are refused before anything is timed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.measure import bench_rows
from engram_export.measure.bench_rows import FORMS, OLD_PATH, SHAPES, run_rows_bench
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # a whole bench: a V4.1 table written, compiled, calibrated and served 4 or 5 ways


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The work folder (the tables are written once, for every test here) and a small tokenizer in it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bench_rows")
    calibration, _ = bench_rows.package_text(folder)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train([str(calibration)], trainers.WordPieceTrainer(vocab_size=2000, special_tokens=["[UNK]"]))
    tokenizer.save(str(folder / "small_tokenizer.json"))
    return folder


def _check(results, stores, out: str) -> None:
    expected = {(store, form, shape) for store in stores for form in FORMS for shape in SHAPES}
    expected |= {(OLD_PATH, "f32", shape) for shape in SHAPES}
    assert sorted((r.store, r.form, r.shape) for r in results) == sorted(expected)
    for r in results:
        numbers = [r.p50_us, r.p99_us, r.numpy_p50_us, r.mb_per_s, r.ratio, *r.rows_per_s.values()]
        assert all(math.isfinite(x) and x > 0 for x in numbers), r
        assert r.p99_us >= r.p50_us and sorted(r.rows_per_s) == [1, 4], r
        width = {"packed": 264, "bf16": 512, "f32": 1024}[r.form]
        assert r.mb_per_s == pytest.approx(r.rows_per_s[1] * width / 1e6), r
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("store "))
    assert lines[header].split() == (
        "store form shape p50 us p99 us rows/s 1 thread rows/s 4 threads MB/s numpy p50 us ratio".split()
    )
    table = lines[header + 2 : header + 2 + len(results)]
    for line, r in zip(table, results, strict=True):  # in the order printed: by shape, then store and form
        cells = line.split()
        assert line.startswith(r.store) and cells[len(r.store.split())] == r.form and cells[-1] == f"{r.ratio:.2f}"
    assert lines[header + 2 + len(results)].startswith("resident rows (mmap, populate, hugepages) within 1.2x")
    assert "row API (populate) against LayerRuntime.lookup, p50: decode B=1" in out


def test_every_row_is_there_and_sane(workdir, capsys):
    results = run_rows_bench(workdir / "small_tokenizer.json", workdir, 1, rounds=3, ray=False)
    out = capsys.readouterr().out
    _check(results, ("mmap", "populate", "hugepages", "tiered"), out)
    assert "tiered (hot set" in out and ", ray (" not in out


@pytest.mark.xdist_group("ray")
def test_the_ray_store(workdir, capsys, monkeypatch):
    """The same with 2 shards on a local Ray cluster (127.0.0.1 only), started and shut down by the bench."""
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # the bench sets the last three: restored after
    results = run_rows_bench(workdir / "small_tokenizer.json", workdir, 1, rounds=3, ray=True)
    _check(results, ("mmap", "populate", "hugepages", "tiered", "ray"), capsys.readouterr().out)


def test_rows_unlike_numpy_are_refused_before_timing(workdir, monkeypatch):
    stored = bench_rows._stored_tables

    def flipped(checkpoint, layer):
        tables = stored(checkpoint, layer)
        tables["packed"][:, 0] ^= np.uint8(1)  # every row's first code: the row API's rows no longer match
        return tables

    monkeypatch.setattr(bench_rows, "_stored_tables", flipped)
    monkeypatch.setattr(bench_rows, "_measure", lambda *args, **kwargs: pytest.fail("timed unchecked rows"))
    with pytest.raises(EngramError, match="bench rows: mmap packed rows of decode B=1 differ from numpy's gather"):
        run_rows_bench(workdir / "small_tokenizer.json", workdir, 1, rounds=3, ray=False)


def test_cli_flags(tmp_path):
    code, _, err = run_cli("bench", "rows", "--table-rows", "0", "--no-ray", "--workdir", tmp_path)
    assert code != 0 and "--table-rows must be >= 1, got 0" in err, err
    code, _, err = run_cli("bench", "rows", "--rounds", "0", "--no-ray")
    assert code != 0 and "--rounds must be >= 1, got 0" in err, err
    code, out, _ = run_cli("bench", "rows", "--help")
    assert code == 0 and all(flag in out for flag in ("--table-rows", "--rounds", "--no-ray", "--tokenizer"))
