"""The benches' backbone at depth (``measure/depth.py``, ``measure/depth_rows.py``): each Engram layer's
wait is counted from when the backbone reaches it, never from the step's end; candidates' rows are the
rows the next step needs when the candidate is the token that came."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.core.text import token_stream, windows
from engram_export.measure import depth
from engram_export.measure.depth import run_round, schedule_for
from engram_export.measure.depth_rows import NgramCandidates, hashed_steps
from engram_export.models.config import load_config
from engram_export.models.deepseek_v41_config import V41Hashing
from tests.helpers import package_prose


class FakeClock:
    """``time`` for depth.py: sleeping moves it, each reading moves it 1 us."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        self.now += 1e-6
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_each_layer_waits_from_when_the_backbone_reaches_it(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(depth, "time", clock)
    schedule = schedule_for(load_config("deepseek-v41"), 0.040)  # 40 layers of 1 ms; Engram layers 1 and 14
    assert (schedule.layers, schedule.engram, schedule.budget_s(1)) == (40, (1, 14), pytest.approx(0.001))
    ready_after = {1: 0.0025, 14: 0.004}  # layer 1's rows come 2.5 ms after the step began, layer 14's at 4 ms
    issued, after = [], []

    def issue(t):
        issued.append(clock.now)
        return clock.now

    def ready(began, layer):
        at = began + ready_after[layer]
        if layer == 1:  # the rows' own time: the caller woke up 0.3 ms after them, which is no wait
            clock.now = max(clock.now, at + 0.0003)
            return at
        clock.now = max(clock.now, at)
        return None

    measured = run_round(schedule, 3, 8, issue, ready, after.append)
    # layer 1 is reached 1 ms in: it waits 1.5 ms, and layer 14 is reached at 1 + 1.5 + 13 ms: no wait
    assert measured.waits[1] == pytest.approx([0.0015] * 3, abs=5e-5)
    assert measured.waits[14] == pytest.approx([0.0] * 3, abs=5e-5)
    assert np.diff(issued) == pytest.approx([0.0415] * 2, abs=5e-5)  # the late wake-up caught up by the sleeps
    assert after == [0, 1, 2] and measured.tokens == 24
    assert measured.seconds == pytest.approx(3 * 0.0415, abs=1e-5)  # the GPU's timeline: 40 ms + the wait
    assert measured.wait_ms(1) == "1.50 / 1.50"


def test_a_schedule_needs_the_backbone_s_layers():
    demo = load_config("tiny")  # the demo's config does not say how deep its backbone is
    with pytest.raises(EngramError, match="give --backbone-layers"):
        schedule_for(demo, 0.015)
    assert schedule_for(demo, 0.015, 12).layers == 12
    with pytest.raises(EngramError, match=r"a backbone of 3 layers cannot carry Engram layers \[1, 14\]"):
        schedule_for(load_config("deepseek-v41"), 0.015, 3)
    with pytest.raises(EngramError, match="num_hidden_layers must be an integer"):
        dataclasses.replace(load_config("deepseek-v41"), num_hidden_layers=14)


def test_candidates_rows_are_the_next_step_s_rows(tokenizer_json, tmp_path):
    """Where the token that came was a candidate, its rows were read ahead: the candidate's hash after
    step t equals the hash the step t+1 of the whole sequence computes, at every t (the first ones hash
    with pads, as the sequence did)."""
    from engram_export.measure.v41_text import v41_with_tokenizer

    text = tmp_path / "prose.txt"
    text.write_text(package_prose()[:200_000])
    config = v41_with_tokenizer(tokenizer_json, 2_000_000)
    hashing = V41Hashing(config)
    stream = token_stream(tokenizer_json, [text])
    calibration, held_out = stream[: len(stream) * 9 // 10], stream[len(stream) * 9 // 10 :]
    candidates = NgramCandidates(calibration, 4)
    ids = windows(held_out, 12, 6)
    steps = hashed_steps(hashing, ids)
    hits = 0
    for t in range(ids.shape[1] - 1):
        chosen, rows = candidates.rows(hashing, ids, t)
        assert chosen.shape == (6, 4) and all(len(set(row)) == 4 for row in chosen.tolist())
        for b, c in zip(*np.nonzero(chosen == ids[:, t + 1 : t + 2]), strict=True):
            hits += 1
            for layer in config.layer_ids:
                np.testing.assert_array_equal(rows[layer][b * 4 + c], steps[layer][t + 1][b])
    assert hits > 5  # prose: the trigram model guesses the next token now and then


def test_the_decode_bench_s_prefetch_at_depth(folders):
    """``bench decode``'s prefetch table fuses the layer after the backbone layers before it, and refuses a
    layer deeper than the backbone."""
    from engram_export.measure.decode_bench import prefetch_rows
    from engram_export.runtime import EngramRuntime

    layer = EngramRuntime(folders["f32"]).layer(3)
    table = dict(prefetch_rows(layer, 2, 3, repeat=2, backbone_layers=4))
    assert set(table) >= {"backbone layers before the Engram layer (3)", "share of the lookup hidden"}, table
    assert float(table["backbone layers before the Engram layer (3)"]) < float(table["backbone stand-in, 4 layers"])
    with pytest.raises(EngramError, match="layer 3 does not fit a backbone of 3 layers"):
        prefetch_rows(layer, 2, 3, repeat=2, backbone_layers=3)


def test_the_rows_tables_run_every_mode(text_folders, tokenizer_json, tmp_path):
    """``bench tiered``'s tables at depth on a small calibrated V4.1 folder: every mode serves the same
    steps, the tiered modes say how their lookups were served, candidates are read and hit."""
    from engram_export.folders.calibration import calibrate
    from engram_export.folders.manifest import read_manifest
    from engram_export.measure.depth_rows import RowsMode, prefill_depth_table, rows_depth_table
    from engram_export.runtime.rows import EngramRows

    text = tmp_path / "prose.txt"
    text.write_text(package_prose()[:80_000])
    stream = token_stream(tokenizer_json, [text])
    compiled, calibrated = text_folders["v41 f32"], tmp_path / "calibrated"
    calibrate(compiled, calibrated, [text], "5%")
    hashing = V41Hashing(read_manifest(calibrated).config)
    tiered = RowsMode("tiered", lambda: EngramRows(calibrated, table_memory="tiered", cache_budget="256KiB"))
    modes = [
        RowsMode("warm", lambda: EngramRows(compiled, table_memory="mmap"), warm=True),
        tiered,
        RowsMode("candidates", tiered.open, candidates=NgramCandidates(stream, 2)),
    ]
    table = rows_depth_table(hashing, modes, stream, 6, (0.02,), (1, 4), steps=5, rounds=1).splitlines()
    assert len(table) == 2 + 2 * 3, table
    cells = [re.split(r"\s{2,}", line.strip()) for line in table[2:]]
    assert [c[2] for c in cells] == ["warm", "tiered", "candidates"] * 2, table
    for warm, plain, ahead in (cells[:3], cells[3:]):
        assert warm[-3:] == ["-", "-", "-"] and plain[-2:] == ["-", "-"], table
        served = [float(share.rstrip("%")) for share in ahead[-3].split(" / ")]
        assert sum(served) == pytest.approx(100, abs=2) and served[2] > 0, table  # candidates served some
        assert float(ahead[-2].rstrip("%")) > 0 and int(ahead[-1].replace(",", "")) > 0, table
    prefill = prefill_depth_table(hashing, [(modes[0], False), (tiered, True)], stream, 6, 0.02, 16, 4)
    assert "tiered + queued read-ahead" in prefill and len(prefill.splitlines()) == 4, prefill
