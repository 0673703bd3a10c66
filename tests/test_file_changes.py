"""Files changed under a live runtime (``openvino/file_guard.py``): never a dead process, never a
silently wrong answer.

A table file truncated in place while 4 threads call the runtime (``table_memory`` mmap, populate and
tiered; the demo family's table inside the IR's .bin, DeepSeek-V4.1's in its checkpoint shard): every
answer is the right one or one ``EngramError`` line naming the file, the process lives, every later
call (decode steps too) is refused, and a runtime over other files in the same process serves on bit
for bit. A file written in place is refused the same way; a new file renamed over the old one is the
safe way to deploy, and serves on unchanged. A fault outside the guarded files still kills the process,
as it would without the guard.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.folders.calibration import calibrate
from engram_export.runtime import EngramRuntime
from tests.helpers import package_prose


@pytest.fixture(scope="module")
def calibrated(text_folders, tmp_path_factory) -> dict[str, Path]:
    """Calibrated folders (servable by every table memory) of the demo family's f32 IR (its table in the
    .bin) and DeepSeek-V4.1's FP8 (its table in the checkpoint shard beside the IR)."""
    root = tmp_path_factory.mktemp("file_changes")
    text = root / "prose.txt"
    text.write_text(package_prose()[:40_000])
    return {
        name: calibrate(text_folders[source], root / name, [text], "30%") and root / name
        for name, source in (("demo", "demo f32"), ("v41", "v41 f32"))
    }


def _table_file(folder: Path, family: str) -> Path:
    """The file the table's bytes are read from."""
    return next(folder.glob("*.bin" if family == "demo" else "*.safetensors"))


def _inputs(runtime, batch: int = 2, tokens: int = 9):
    config, rng = runtime.config, np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (batch, tokens))
    hidden = rng.standard_normal((batch, tokens, config.hc_mult, config.hidden_size)).astype(np.float32)
    mask = np.ones((batch, tokens), bool) if runtime.info.takes_mask else None
    return ids, hidden, mask


def _truncated_under_threads(call, expected, table: Path) -> tuple[list, list]:
    """``call()`` from 4 threads while ``table`` is truncated to its first page, each until it made 30 calls
    begun after the truncation (a fast call could otherwise be done before it) or saw 4 refusals: (whether
    the table was truncated yet, for each answer that was not ``expected``; the message of each refusal)."""
    wrong, refusals, truncated = [], [], threading.Event()

    def calls():
        after = 0
        while after < 30:
            after += truncated.is_set()
            try:
                got = call()
            except EngramError as exc:
                refusals.append(str(exc))
            else:
                if not np.array_equal(got, expected):
                    wrong.append(truncated.is_set())
            if len(refusals) > 3:
                return

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for thread in threads:
        thread.start()
    os.truncate(table, 4096)  # the first page stays: a read of any other vanishes
    truncated.set()
    for thread in threads:
        thread.join()
    return wrong, refusals


@pytest.mark.parametrize("family", ["demo", "v41"])
@pytest.mark.parametrize("table_memory", ["mmap", "populate", "tiered"])
def test_a_table_truncated_under_threads_is_refused_and_the_process_serves_on(
    calibrated, family, table_memory, tmp_path
):
    folder = shutil.copytree(calibrated[family], tmp_path / "served")
    runtime = EngramRuntime(folder, table_memory=table_memory)
    untouched = EngramRuntime(calibrated[family], table_memory=table_memory)
    layer = runtime.layer_ids[0]
    ids, hidden, mask = _inputs(runtime)
    expected = untouched[layer](ids, hidden, mask)
    np.testing.assert_array_equal(runtime[layer](ids, hidden, mask), expected)
    session = runtime.session(2)
    session.prefill(ids, dict.fromkeys(runtime.layer_ids, hidden), mask)
    table = _table_file(folder, family)
    wrong, refusals = _truncated_under_threads(lambda: runtime[layer](ids, hidden, mask), expected, table)
    assert wrong == []
    assert refusals and all(table.name in message for message in refusals), refusals
    for call in (
        lambda: runtime[layer](ids, hidden, mask),
        lambda: runtime[layer].lookup(ids, mask),
        lambda: session.step(
            ids[:, :1], dict.fromkeys(runtime.layer_ids, hidden[:, :1]), None if mask is None else mask[:, :1]
        ),
    ):
        with pytest.raises(EngramError, match=table.name):
            call()
    np.testing.assert_array_equal(untouched[layer](ids, hidden, mask), expected)  # the process serves on


@pytest.mark.parametrize("family", ["demo", "v41"])
def test_a_file_written_in_place_is_refused(calibrated, family, tmp_path):
    folder = shutil.copytree(calibrated[family], tmp_path / "served")
    runtime = EngramRuntime(folder)
    ids, hidden, mask = _inputs(runtime)
    runtime[runtime.layer_ids[0]](ids, hidden, mask)
    table = _table_file(folder, family)
    with open(table, "r+b") as file:  # the same bytes, written in place: still a write under a live runtime
        first = file.read(64)
        file.seek(0)
        file.write(first)
    changed = rf"{table.name} was changed in place \(written or truncated\) while this runtime served it"
    with pytest.raises(EngramError, match=changed):
        runtime[runtime.layer_ids[0]](ids, hidden, mask)


@pytest.mark.parametrize("family", ["demo", "v41"])
def test_a_new_file_renamed_over_the_old_one_is_safe(calibrated, family, tmp_path):
    """The way docs/serving.md gives to deploy new files: the runtime serves on from the old ones."""
    folder = shutil.copytree(calibrated[family], tmp_path / "served")
    runtime = EngramRuntime(folder, table_memory="populate")
    layer = runtime.layer_ids[0]
    ids, hidden, mask = _inputs(runtime)
    expected = runtime[layer](ids, hidden, mask)
    table = _table_file(folder, family)
    replacement = table.with_name(table.name + ".new")
    replacement.write_bytes(bytes(len(table.read_bytes())))  # other bytes: zeros
    os.replace(replacement, table)
    for _ in range(3):
        np.testing.assert_array_equal(runtime[layer](ids, hidden, mask), expected)
    assert runtime.verification.error is None


def test_a_fault_outside_the_guarded_files_still_kills_the_process(calibrated, tmp_path):
    """The guard answers only for the files it guards: any other vanished page kills the process, as it
    would without it (a runtime is loaded first, so the handler is installed)."""
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(3 * 4096))
    script = (
        "import os, sys, numpy as np\n"
        "from engram_export.runtime import EngramRuntime\n"
        f"runtime = EngramRuntime({str(calibrated['demo'])!r})\n"
        f"mapped = np.memmap({str(other)!r}, np.uint8, 'r')\n"
        f"os.truncate({str(other)!r}, 0)\n"
        "print(int(mapped[8192]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("when", ["before the guard", "after the guard, then a call", "after the guard"])
def test_python_faulthandler_enabled_by_a_library_does_not_kill_a_guarded_read(calibrated, tmp_path, when):
    """A library that enables Python's faulthandler (Ray, pytest) installs a SIGBUS handler over the
    guard's: the guard goes back on top at its next call; until then faulthandler passes the fault back
    to it. Either way the read of the truncated table is refused in one line and the process lives."""
    folder = shutil.copytree(calibrated["v41"], tmp_path / "served")
    table = next(folder.glob("layer_1.*.safetensors"))
    enable = "faulthandler.enable()\n"
    script = (
        "import faulthandler, os, numpy as np\n"
        + (enable if when == "before the guard" else "")
        + "from engram_export.core.errors import EngramError\n"
        "from engram_export.runtime.rows import EngramRows\n"
        f"rows = EngramRows({str(folder)!r})\n"
        "ids = np.arange(rows[1].table_rows)\n"
        + (enable if when != "before the guard" else "")
        + ("rows.read(1, ids[:1], form='packed')\n" if when == "after the guard, then a call" else "")
        + f"os.truncate({str(table)!r}, 4096)\n"
        "try:\n"
        "    rows.read(1, ids, form='packed')\n"
        "except EngramError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith(f"refused: {table}"), done.stdout


@pytest.mark.parametrize("runtime_name", ["ort", "ov"])
def test_external_data_truncated_under_an_onnx_runtime(tiny_layer, runtime_name, tmp_path):
    """ONNX Runtime maps an .onnx file's external data itself (its mappings are found by comparing the
    process's mappings before and after the session is made); OpenVINO reading the .onnx maps it too."""
    from engram_export.onnx.export import export_layer

    path = export_layer(tiny_layer, tmp_path / "layer.onnx", external_data_threshold=1000)
    runtime = EngramRuntime(path, runtime=runtime_name)
    ids, hidden, _ = _inputs(runtime)
    expected = runtime(ids, hidden)
    untouched = EngramRuntime(export_layer(tiny_layer, tmp_path / "other.onnx", external_data_threshold=1000))
    os.truncate(tmp_path / "layer.onnx.data", 0)
    for _ in range(2):
        with pytest.raises(EngramError, match=r"layer\.onnx\.data was (truncated|changed in place)"):
            runtime(ids, hidden)
    np.testing.assert_allclose(untouched(ids, hidden), expected, rtol=1e-5, atol=1e-6)  # f32 paths: same numbers


@pytest.mark.parametrize("table_memory", ["mmap", "tiered"])
def test_the_row_api_refuses_reads_of_a_truncated_table_and_the_process_serves_on(calibrated, table_memory, tmp_path):
    """``EngramRows`` (the engines' row API) reads under the same guard: a table truncated while threads
    read rows gives no wrong row; the reads after it are refused in one line naming the file."""
    from engram_export.runtime.rows import EngramRows

    folder = shutil.copytree(calibrated["v41"], tmp_path / "served")
    rows, untouched = EngramRows(folder, table_memory=table_memory), EngramRows(calibrated["v41"])
    layer = rows.layer_ids[0]
    ids = np.random.default_rng(0).integers(0, rows[layer].table_rows, (64, 24))
    expected = untouched.read(layer, ids, form="packed")
    np.testing.assert_array_equal(rows.read(layer, ids, form="packed"), expected)
    table = next(folder.glob(f"layer_{layer}.*.safetensors"))
    wrong, refusals = _truncated_under_threads(lambda: rows.read(layer, ids, form="packed"), expected, table)
    assert wrong == []
    assert refusals and all(table.name in message for message in refusals), refusals
    with pytest.raises(EngramError, match=table.name):
        rows.read(layer, ids, form="packed")
    np.testing.assert_array_equal(untouched.read(layer, ids, form="packed"), expected)


def test_a_shared_hot_set_truncated_is_refused(calibrated, tmp_path):
    """``hot_set_memory="shared"`` serves the hot rows from the hot set files' pages: a hot file truncated
    under a runtime and a row API is refused in one line naming it, as the table is."""
    from engram_export.runtime.rows import EngramRows

    folder = shutil.copytree(calibrated["v41"], tmp_path / "served")
    runtime = EngramRuntime(folder, table_memory="tiered", hot_set_memory="shared")
    rows = EngramRows(folder, table_memory="tiered", hot_set_memory="shared")
    layer = runtime.layer_ids[0]
    ids, hidden, mask = _inputs(runtime)
    expected = EngramRuntime(calibrated["v41"])[layer](ids, hidden, mask)
    np.testing.assert_array_equal(runtime[layer](ids, hidden, mask), expected)
    hot = next(folder.glob(f"layer_{layer}.hot.codes.npy"))
    os.truncate(hot, 0)
    with pytest.raises(EngramError, match=hot.name):
        runtime[layer](ids, hidden, mask)
    everything = np.arange(rows[layer].table_rows)  # every row: the hot ones too
    with pytest.raises(EngramError, match=hot.name):
        rows.read(layer, everything, form="packed")
