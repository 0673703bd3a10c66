"""Tiered tables: ``engram-export calibrate`` and ``table_memory="tiered"``.

The hot set is checked against a brute-force count of the text's lookups; a tiered runtime must equal
``table_memory="populate"`` bit for bit for every family, stored table form and precision, with and
without a cache, also when every miss is a disk read (the files evicted from the page cache first) and
with many threads' prefetches in flight; the manifest binds the hot sets; every refusal is one line.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import engram_export.core.resources as resources
from engram_export.core import text as text_module
from engram_export.core.errors import EngramError
from engram_export.core.text import token_pieces, token_stream, windows
from engram_export.folders import calibration, compile_folder, export_checkpoint, quantize_folder
from engram_export.folders.calibration import HELD_OUT, calibrate, choose_hot_rows
from engram_export.folders.manifest import read_manifest
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.models.compression import build_compression_table
from engram_export.models.hashing import EngramHashing
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.quantize import QuantizeOptions
from engram_export.openvino.row_kernel import stored_table
from engram_export.openvino.stages import split_stages
from engram_export.openvino.tiered import _file_region
from engram_export.runtime import EngramRuntime
from tests.helpers import listing, package_prose, refused, run_cli
from tests.v41_spec import TINY


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    prose = package_prose()
    path = tmp_path_factory.mktemp("tiered_text") / "prose.txt"
    path.write_text(prose[:150_000])
    return path


@pytest.fixture(scope="module")
def served(tokenizer_json, text_folders, tmp_path_factory) -> dict[str, Path]:
    """Folders of every stored table form: the demo family's f32 (ONNX and IR), f16 (bf16 IR), u8 and
    u4; DeepSeek-V4.1's FP8 (ONNX, f32 and bf16 IR), bf16 and f32 tables (``text_folders``, and the rest
    made from them or alike)."""
    root = tmp_path_factory.mktemp("tiered")
    demo = text_folders["demo onnx"]
    folders = {
        "demo f32 onnx": demo,
        "demo f32": text_folders["demo f32"],
        "demo f16 (bf16 IR)": compile_folder(demo, root / "demo_bf16", "bf16"),
        "demo u8": quantize_folder(demo, root / "demo_u8", QuantizeOptions("int8-weights")),
        "demo u4": text_folders["demo u4"],
        "v41 F8_E4M3": text_folders["v41 f32"],
        "v41 F8_E4M3 onnx": text_folders["v41 onnx"],
        "v41 F8_E4M3 (bf16 IR)": compile_folder(text_folders["v41 onnx"], root / "v41_fp8_bf16", "bf16"),
    }
    lut = build_compression_table(str(tokenizer_json))  # the BERT tokenizer's compression, as released
    v41 = {**TINY, "vocab_size": len(lut), "engram_compressed_vocab_size": int(lut.max()) + 1}
    for dtype in ("BF16", "F32"):
        checkpoint = write_v41_checkpoint(root / f"ckpt_{dtype}", v41, seed=2, table_dtype=dtype)
        shutil.copyfile(tokenizer_json, checkpoint / "tokenizer.json")
        exported = export_checkpoint(checkpoint, root / f"v41_{dtype}_onnx")
        folders[f"v41 {dtype}"] = compile_folder(exported, root / f"v41_{dtype}_f32", "f32")
    return folders


@pytest.fixture(scope="module")
def calibrated(served, text, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibrated")
    return {
        name: (calibrate(folder, root / name.replace(" ", "_"), [text], "30%"), root / name.replace(" ", "_"))[1]
        for name, folder in served.items()
    }


def _inputs(runtime, text: Path, batch: int, tokens: int, seed: int = 0):
    info = runtime.info
    ids = windows(token_stream(info.config.tokenizer, [text]), tokens, batch)
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((batch, tokens, info.config.hc_mult, info.config.hidden_size)).astype(np.float32)
    mask = rng.random((batch, tokens)) > 0.2 if info.takes_mask else None
    return ids, hidden, mask


FORMS = [
    "demo f32 onnx",
    "demo f32",
    "demo f16 (bf16 IR)",
    "demo u8",
    "demo u4",
    "v41 F8_E4M3",
    "v41 F8_E4M3 onnx",
    "v41 F8_E4M3 (bf16 IR)",
    "v41 BF16",
    "v41 F32",
]


@pytest.mark.parametrize("form", FORMS)
def test_tiered_equals_populate(served, calibrated, text, form):
    precisions = [None, "bf16"] if form in ("demo f32", "v41 F8_E4M3") else [None]
    for precision in precisions:
        resident = EngramRuntime(served[form], table_memory="populate", precision=precision)
        tiered = {
            "no cache": EngramRuntime(calibrated[form], table_memory="tiered", precision=precision),
            # a cache far smaller than the rows read: evictions on every call
            "cache": EngramRuntime(calibrated[form], table_memory="tiered", cache_budget=40_000, precision=precision),
            # the hot rows in the hot set files' pages, shared by every process on the host (u4 zero points too)
            "shared hot set": EngramRuntime(
                calibrated[form], table_memory="tiered", hot_set_memory="shared", precision=precision
            ),
        }
        for batch, tokens in ((50, 14), (1, 1), (3, 17)):
            ids, hidden, mask = _inputs(resident, text, batch, tokens, seed=batch)
            for layer_id in resident:
                expected = resident[layer_id](ids, hidden, mask)
                for name, runtime in tiered.items():
                    for _ in range(2):  # the second call finds rows in the cache
                        assert np.array_equal(runtime[layer_id](ids, hidden, mask), expected, equal_nan=True), (
                            name,
                            precision,
                            layer_id,
                            (batch, tokens),
                        )
        for layer_id in resident:
            stats = tiered["cache"][layer_id].table_stats()
            assert stats["hot_hits"] > 0 and stats["rows_read"] > 0 and stats["cache_hits"] > 0, stats
            assert stats["lookups"] == stats["hot_hits"] + stats["cache_hits"] + _read_lookups(stats), stats
            assert tiered["no cache"][layer_id].table_stats()["cache_hits"] == 0


def _read_lookups(stats: dict) -> int:
    """Lookups served by a read: at least the distinct rows read (a row looked up twice in a call is read once)."""
    served_by_memory = stats["hot_hits"] + stats["cache_hits"]
    assert stats["lookups"] - served_by_memory >= stats["rows_read"]
    return stats["lookups"] - served_by_memory


@pytest.mark.parametrize("table_rows", [40, 3000, 10**6])
def test_the_row_counter_equals_a_brute_force_count(table_rows, monkeypatch):
    """Small batches: sorted runs merged (a large table), then the move to a count per row once the runs
    hold half the rows (small tables), and a count past 32 bits there."""
    monkeypatch.setattr(calibration, "_BATCH", 700)
    rng, counter, added = np.random.default_rng(table_rows), calibration.RowCounter(table_rows), []
    for _ in range(25):
        rows = rng.integers(0, table_rows, int(rng.integers(1, 900)))
        counter.add(rows)
        added.append(rows)
    rows, counts = counter.result()
    expected_rows, expected_counts = np.unique(np.concatenate(added), return_counts=True)
    assert np.array_equal(rows, expected_rows) and np.array_equal(counts, expected_counts)
    assert (counter._dense is not None) == (table_rows < 10**6)
    if counter._dense is not None:
        counter._dense[rows[0]] = 2**32 - 1
        counter.add(np.array([rows[0]]))
        assert counter.result()[1][0] == 2**32


def test_text_is_read_in_pieces_that_lose_nothing(tmp_path, monkeypatch):
    """Pieces end at a break, else before a character that may be cut: multi-byte characters and long
    runs without whitespace come back whole, and a bad byte far into the file is named by its offset."""
    monkeypatch.setattr(text_module, "_PIECE_BYTES", 7)
    tricky = "héllo wörld\n\n" + "€😀" * 20 + " x" + "ß" * 11 + "\nend"
    (tmp_path / "tricky.txt").write_text(tricky)
    assert text_module.read_text(tmp_path / "tricky.txt") == tricky
    (tmp_path / "bad.txt").write_bytes(tricky.encode() + b"\xff tail")
    with pytest.raises(EngramError, match=f"bad.txt is not UTF-8 \\(byte {len(tricky.encode())}:"):
        text_module.read_text(tmp_path / "bad.txt")
    (tmp_path / "blank.txt").write_text(" \n\n \t\n" * 5)
    with pytest.raises(EngramError, match="blank.txt is empty"):
        text_module.read_text(tmp_path / "blank.txt")


def test_hot_set_is_the_brute_force_choice(served, text, tmp_path, monkeypatch):
    """Under a budget that holds part of the rows reached, the hot set is the rows with the most lookups per
    stored byte across both layers, counted here by hashing the calibration text as one sequence, and its
    packed bytes are the table's bytes of those rows. Calibrate reads the text in small pieces, hashes it
    in small windows and sorts small batches here: the counts must not see the seams."""
    folder = served["demo u8"]
    manifest = read_manifest(folder)
    config = manifest.config
    small = tmp_path / "small.txt"
    small.write_text(text.read_text()[:10_000])
    monkeypatch.setattr(text_module, "_PIECE_BYTES", 1500)
    monkeypatch.setattr(calibration, "_WINDOW", 200)
    monkeypatch.setattr(calibration, "_BATCH", 1000)
    pieces = list(token_pieces(config.tokenizer, [small], HELD_OUT))
    assert len(pieces) > 5
    stream = np.concatenate([piece.ids for piece in pieces])
    assert np.array_equal(stream, token_stream(config.tokenizer, [small]))  # cuts at whitespace: no token changed
    held_out_bytes = sum(piece.size for piece in pieces if piece.held_out)
    assert int(small.stat().st_size * HELD_OUT) <= held_out_bytes < small.stat().st_size * HELD_OUT + 100
    cut = sum(len(piece.ids) for piece in pieces if not piece.held_out)
    hashing = EngramHashing(config)
    tables = {
        layer: stored_table(split_stages(read_openvino(folder / name)[0])[0]) for layer, name in manifest.layers.items()
    }
    row_bytes = {layer: table.layout.bytes_per_row for layer, table in tables.items()}
    budget = 4000

    def choose(counts: collections.Counter) -> dict[int, list[int]]:
        """The rows with the most lookups per byte across both layers, up to the budget."""
        ranked = sorted(counts, key=lambda key: (-counts[key] / row_bytes[key[0]], key[0], key[1]))
        used, chosen = 0.0, collections.defaultdict(list)
        for layer, row in ranked:
            if used + row_bytes[layer] > budget:
                break
            used += row_bytes[layer]
            chosen[layer].append(row)
        return chosen

    # the held-out hit rate is measured with a set chosen from the first nine tenths; the set written is
    # chosen from all of the text (two sequences: the cut starts one, as in calibrate)
    head, tail = collections.Counter(), collections.Counter()
    for layer in manifest.layers:
        head.update((layer, row) for row in hashing.rows(stream[None, :cut], layer).ravel().tolist())
        tail.update((layer, row) for row in hashing.rows(stream[None, cut:], layer).ravel().tolist())
    measured, expected = choose(head), choose(head + tail)
    assert expected != measured  # the last tenth changes the choice: the test tells them apart
    report = calibrate(folder, tmp_path / "out", [small], budget)
    assert report["hot_budget_bytes"] == budget and report["chosen_from"].startswith("all the text")
    for layer, name in manifest.layers.items():
        rows = np.load(tmp_path / "out" / f"{Path(name).stem}.hot.rows.npy")
        assert rows.tolist() == sorted(expected[layer]), layer
        arrays = tables[layer].arrays()
        codes = np.load(tmp_path / "out" / f"{Path(name).stem}.hot.codes.npy")
        assert np.array_equal(codes.reshape(len(rows), -1), arrays["codes"][rows])
        held_out = collections.Counter(hashing.rows(stream[None, cut:], layer).ravel().tolist())
        hits = sum(n for row, n in held_out.items() if row in set(measured[layer])) / sum(held_out.values())
        assert report["layers"][str(layer)]["held_out_hit_rate"] == pytest.approx(hits)


def test_the_bench_times_calibrate_on_shuffled_text(served, text, tmp_path):
    """``bench tiered``'s calibrate speed: a MiB of the text's words shuffled, every n-gram new."""
    from engram_export.measure.tiered_calibrate_speed import calibration_speed

    table = calibration_speed(served["v41 F8_E4M3"], [text], tmp_path, 1)
    shuffled = (tmp_path / "shuffled_1MiB.txt").read_text()
    assert len(shuffled.encode()) >= 2**20 and sorted(shuffled.split()[:5000]) != shuffled.split()[:5000]
    assert sorted(shuffled[:20_000].split()) != sorted(text.read_text()[:20_000].split())  # shuffled, not copied
    row = table.splitlines()[-1].split()
    assert int(row[1].replace(",", "")) > 200_000 and float(row[3].replace(",", "")) > 0  # tokens, tokens/s
    assert not (tmp_path / "calibration_speed").exists()


def test_a_budget_too_small_for_one_row_serves_every_row_from_disk(served, text, tmp_path):
    report = calibrate(served["v41 F8_E4M3"], tmp_path / "none", [text], 1)
    assert all(entry["hot_rows"] == 0 and entry["held_out_hit_rate"] == 0 for entry in report["layers"].values())
    resident = EngramRuntime(served["v41 F8_E4M3"], table_memory="populate")
    tiered = EngramRuntime(tmp_path / "none", table_memory="tiered")
    ids, hidden, mask = _inputs(resident, text, 3, 5)
    for layer in resident:
        assert np.array_equal(tiered[layer](ids, hidden, mask), resident[layer](ids, hidden, mask))
        assert tiered[layer].table_stats()["hot_hits"] == 0


def test_the_tier_struct_is_checked_against_the_library(monkeypatch):
    """tiered.py's ctypes copy of EngramTierSpec is held to the library's layout version and struct size:
    the built library passes; a version, a size or a library without them is refused in one line."""
    import ctypes
    import types

    from engram_export.openvino import tiered

    library = tiered._library()  # opening it checks the layout
    assert (library.engram_tier_abi_version(), library.engram_tier_spec_size()) == (
        tiered.TIER_ABI_VERSION,
        ctypes.sizeof(tiered._Spec),
    )
    size = ctypes.sizeof(tiered._Spec)
    monkeypatch.setattr(tiered, "TIER_ABI_VERSION", tiered.TIER_ABI_VERSION + 1)
    version = tiered.TIER_ABI_VERSION
    with pytest.raises(
        EngramError,
        match=rf"^lib\.so has tier layout version {version - 1} \({size} bytes\), "
        rf"openvino/tiered\.py version {version} \({size} bytes\): rebuild",
    ):
        tiered._check_layout(library, "lib.so")
    monkeypatch.undo()

    class Longer(ctypes.Structure):
        _fields_ = [*tiered._Spec._fields_, ("added", ctypes.c_uint64)]

    monkeypatch.setattr(tiered, "_Spec", Longer)
    with pytest.raises(EngramError, match=rf"\({size} bytes\), openvino/tiered\.py version \d+ \({size + 8} bytes\)"):
        tiered._check_layout(library, "lib.so")
    with pytest.raises(EngramError, match="lib.so has no tier layout version"):
        tiered._check_layout(types.SimpleNamespace(), "lib.so")


def test_choose_hot_rows_weighs_bytes():
    counts = {1: (np.array([5, 9]), np.array([10, 5])), 2: (np.array([7]), np.array([12]))}
    # layer 2's row costs 3x the bytes: its 12 lookups / 300 B earn less than 5 lookups / 100 B
    assert {k: v.tolist() for k, v in choose_hot_rows(counts, {1: 100, 2: 300}, 200).items()} == {1: [5, 9], 2: []}
    assert {k: v.tolist() for k, v in choose_hot_rows(counts, {1: 100, 2: 100}, 200).items()} == {1: [5], 2: [7]}
    assert {k: v.tolist() for k, v in choose_hot_rows(counts, {1: 100, 2: 100}, 99).items()} == {1: [], 2: []}


def _table_middle(folder: Path) -> tuple[str, int]:
    """(file, offset) of the middle of the first layer's table codes, where the model maps them."""
    manifest = read_manifest(folder)
    model = read_openvino(folder / next(iter(manifest.layers.values())))[0]
    codes = stored_table(split_stages(model)[0]).arrays()["codes"]
    path, offset, _, _ = _file_region(codes)
    return path, offset + codes.nbytes // 2


def _evict(folder: Path, path: str, offset: int) -> bool:
    """Drop every file of ``folder`` from the page cache (pages mapped by a live runtime stay); True if
    the table's byte at ``path``, ``offset`` really left it."""
    for _ in range(3):  # runtimes of earlier tests map these files too (freed in stages)
        gc.collect()
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # a file written moments ago: dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(64)], offset, os.RWF_NOWAIT)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "form,miss_reads", [("demo u4", "threads"), ("v41 F8_E4M3", "threads"), ("v41 F8_E4M3", "readahead")]
)
def test_misses_read_from_disk_are_right(served, calibrated, text, form, miss_reads):
    table_middle = _table_middle(calibrated[form])
    resident = EngramRuntime(served[form], table_memory="populate")
    ids, hidden, mask = _inputs(resident, text, 50, 14, seed=5)
    ids = (ids * 7 + 11) % resident.info.num_ids  # other n-grams than the text's: mostly misses
    expected = {layer: resident[layer](ids, hidden, mask) for layer in resident}
    del resident  # its mapping of the table holds the pages in memory
    for _ in range(3):  # another test worker reading the same file may bring its pages back: try again
        tiered = EngramRuntime(calibrated[form], table_memory="tiered", miss_reads=miss_reads)
        evicted = _evict(calibrated[form], *table_middle)  # after the load, which maps the table
        handle = tiered.prefetch(ids, mask)
        queued = []
        for layer in tiered:
            assert np.array_equal(tiered[layer].fuse(handle, hidden), expected[layer], equal_nan=True)
            stats = tiered[layer].table_stats()
            assert stats["rows_read"] > stats["hot_hits"] and stats["prefetched_calls"] == 1
            queued.append(stats["queued_rows"])
        if not evicted or min(queued) > 0:
            break
    assert not evicted or min(queued) > 0, queued  # every layer's misses were really read from disk


def test_threads_with_prefetches_in_flight(served, calibrated, text):
    form = "v41 F8_E4M3"
    resident = EngramRuntime(served[form], table_memory="populate")
    tiered = EngramRuntime(calibrated[form], table_memory="tiered", cache_budget="64KiB")
    cases = []
    for seed in range(8):
        ids, hidden, mask = _inputs(resident, text, 4, 9, seed=seed)
        ids = np.roll(ids, seed, axis=1)
        cases.append((ids, hidden, mask, {layer: resident[layer](ids, hidden, mask) for layer in resident}))
    failures, barrier = [], threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        for round_ in range(6):
            ids, hidden, mask, expected = cases[(index + round_) % len(cases)]
            handles = [tiered.prefetch(ids, mask) for _ in range(2)]  # two in flight per thread
            for handle in handles:
                for layer in tiered:
                    if not np.array_equal(tiered[layer].fuse(handle, hidden), expected[layer], equal_nan=True):
                        failures.append((index, round_, layer))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


def test_decode_session_on_tiered(served, calibrated, text):
    """Prefill then token by token, each step's lookups prefetched: the same outputs, bit for bit, as a
    session on the resident table; a refused prefetch or step leaves the session as it was."""
    form = "v41 F8_E4M3"
    resident = EngramRuntime(served[form], table_memory="populate")
    tiered = EngramRuntime(calibrated[form], table_memory="tiered", cache_budget="16KiB")
    ids, hidden, mask = _inputs(resident, text, 2, 6, seed=3)
    sessions = [resident.session(2), tiered.session(2)]
    per_layer = {layer: hidden for layer in resident}
    outputs = [s.prefill(ids[:, :3], {k: h[:, :3] for k, h in per_layer.items()}, mask[:, :3]) for s in sessions]
    assert all(np.array_equal(outputs[0][k], outputs[1][k]) for k in resident)
    for t in range(3, ids.shape[1]):
        sessions[1].prefetch(ids[:, t : t + 1], mask[:, t : t + 1])  # the lookups start before the "backbone"
        if t == 3:
            with pytest.raises(EngramError, match="a prefetch is already in flight"):
                sessions[1].prefetch(ids[:, t : t + 1], mask[:, t : t + 1])
            with pytest.raises(EngramError, match="differ from those prefetched"):
                sessions[1].step(
                    ids[:, t : t + 1] + 1, {k: h[:, t : t + 1] for k, h in per_layer.items()}, mask[:, t : t + 1]
                )
        step = [
            s.step(ids[:, t : t + 1], {k: h[:, t : t + 1] for k, h in per_layer.items()}, mask[:, t : t + 1])
            for s in sessions
        ]
        assert all(np.array_equal(step[0][k], step[1][k]) for k in resident), t
    assert all(tiered[k].table_stats()["calls"] >= ids.shape[1] - 2 for k in tiered)


def test_manifest_binds_the_hot_sets(calibrated, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(calibrated["demo u8"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    hot_files = [f for layer in manifest["calibration"]["layers"].values() for f in layer["files"]]
    assert hot_files and all(f in manifest["files"] for f in hot_files)
    codes = folder / next(f for f in hot_files if f.endswith(".hot.codes.npy"))
    data = bytearray(codes.read_bytes())
    data[-1] ^= 0x01
    codes.write_bytes(bytes(data))
    with pytest.raises(EngramError, match=r"hot\.codes\.npy does not match"):
        EngramRuntime(folder, table_memory="tiered")
    codes.unlink()
    with pytest.raises(EngramError, match="missing"):
        EngramRuntime(folder, table_memory="tiered")


def test_calibrate_cli_and_refusals(served, calibrated, text, tmp_path, monkeypatch):
    source = served["demo f32"]
    before = listing(source)
    code, out, err = run_cli("calibrate", source, "--text", text, "--hot-budget", "1GiB", "-o", tmp_path / "all")
    assert code == 0, err
    assert "the budget is at least the whole tables" in out and "held-out hits" in out
    assert listing(source) == before  # never writes into its input
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_text(" \n ")
    for extra, message in [
        (["--text", tmp_path / "latin1.txt", "--hot-budget", "1MiB"], "latin1.txt is not UTF-8"),
        (["--text", tmp_path / "empty.txt", "--hot-budget", "1MiB"], "empty.txt is empty"),
        (["--text", text, "--hot-budget", "0"], "hot budget must be more than 0 bytes"),
        (["--text", text, "--hot-budget=-5MiB"], "hot budget must be a size"),
        (["--text", text, "--hot-budget", "lots"], "hot budget must be a size (8GiB, 512MiB, bytes) or a percentage"),
    ]:
        refused(run_cli("calibrate", source, *extra, "-o", tmp_path / "out"), message)
        assert not (tmp_path / "out").exists()
    refused(
        run_cli("calibrate", calibrated["demo f32"], "--text", text, "--hot-budget", "1%", "-o", tmp_path / "again"),
        "already calibrated",
    )
    refused(
        run_cli("calibrate", source / "layer_1.xml", "--text", text, "--hot-budget", "1%", "-o", tmp_path / "x"),
        "takes a folder",
    )
    code, _, err = run_cli("bench", "tiered")
    assert code == 2 and "engram-export bench tiered: error: the following arguments are required: --text" in err
    code, _, err = run_cli("bench", "layer", "--text", text)
    assert code == 2 and "engram-export bench layer: error: unrecognized arguments: --text" in err
    refused(run_cli("bench", "tiered", "--text", text, "--table-rows", 10), "--table-rows must be >= 1000000")
    with pytest.raises(EngramError, match="needs a calibrated folder: run engram-export calibrate"):
        EngramRuntime(source, table_memory="tiered")
    with pytest.raises(EngramError, match="serves a folder made by engram-export calibrate"):
        EngramRuntime(source / "layer_1.xml", table_memory="tiered")
    with pytest.raises(EngramError, match="miss_reads must be one of auto, readahead, threads, uring, got 'aio'"):
        EngramRuntime(calibrated["demo f32"], table_memory="tiered", miss_reads="aio")
    with pytest.raises(EngramError, match="cache_budget is the cache of table_memory='tiered'"):
        EngramRuntime(source, cache_budget="1GiB")
    with pytest.raises(EngramError, match="needs the OpenVINO runtime"):
        EngramRuntime(calibrated["demo f32 onnx"], table_memory="tiered", runtime="ort")
    with pytest.raises(EngramError, match="table_stats counts a tiered table"):
        EngramRuntime(source)[1].table_stats()
    refused(
        run_cli("calibrate", source, "--text", text, "--hot-budget", "1%", "-o", source), "would overwrite an input"
    )
    almost_full = shutil.disk_usage("/")._replace(free=1000)
    with monkeypatch.context() as patch:
        patch.setattr(resources.shutil, "disk_usage", lambda _: almost_full)
        refused(
            run_cli("calibrate", source, "--text", text, "--hot-budget", "1%", "-o", tmp_path / "full"),
            "the hot sets",
        )
    assert not (tmp_path / "full").exists()
    import engram_export.runtime.model as model

    monkeypatch.setattr(model, "available_memory", lambda: 1000)
    with pytest.raises(EngramError, match=r"GiB needed, 0\.00 GiB available"):
        EngramRuntime(calibrated["demo f32"], table_memory="tiered", cache_budget="1MiB")


def test_a_table_truncated_after_load_fails_the_call_in_one_line(calibrated, text, tmp_path):
    """The tail is read when a call needs it: a table file cut short after load fails that call (one-shot,
    prefetched, or a decode step) with one line naming the file, never with zeros or a crash (the tier's
    short read fails the call; the file guard names the file that changed: test_file_changes.py)."""
    folder = tmp_path / "copy"
    shutil.copytree(calibrated["v41 F8_E4M3"], folder)  # copies: the test cuts them
    runtime = EngramRuntime(folder, table_memory="tiered")
    ids, hidden, mask = _inputs(runtime, text, 4, 9, seed=4)
    ids = (ids * 7 + 11) % runtime.info.num_ids  # mostly misses
    for shard in folder.glob("*.safetensors"):
        os.truncate(shard, 4096)
    layer = runtime.layer_ids[0]
    changed = r"\.safetensors was changed in place \(written or truncated\) while this runtime served it"
    handle = runtime.prefetch(ids, mask)  # started before the runtime knows: its lookup fails
    with pytest.raises(EngramError, match=changed) as refused:
        runtime[layer].fuse(handle, hidden)
    assert re.search(r"reading row \d+ of the table file: the file ends before it", str(refused.value.__context__))
    with pytest.raises(EngramError, match=changed):  # from then on, every call
        runtime[layer](ids, hidden, mask)
    with pytest.raises(EngramError, match=changed):
        runtime.session(4).prefill(ids, {k: hidden for k in runtime}, mask)
